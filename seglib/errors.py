"""The errors a user can cause (bad files, flags or data) and how a script reports them: one line on stderr
and exit status 1, never a traceback. Imports nothing of the project, so every module can raise them."""
import sys


class DataError(ValueError):
    """A problem with the dataset on disk; the message names the file and says what is wrong."""


class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint; the message names the file."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says why and what was kept."""


class ExportError(RuntimeError):
    """An export that cannot be written or does not match the model; the message names the file."""


class ModelError(ValueError):
    """An unknown model, or backbone weights that cannot be had or do not fit; the message says which."""


USER_ERRORS = (DataError, CheckpointError, TrainingError, ExportError, ModelError)


def run_cli(main, parser):
    """Run ``main(parser.parse_args())``; a user error becomes one line on stderr and exit status 1."""
    try:
        main(parser.parse_args())
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
