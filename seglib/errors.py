"""The errors a user can cause (bad files, flags or data) and how a script reports them: one line on stderr
and exit status 1, never a traceback. Imports only model_utils.py, which sits below the package and defines
the two errors it raises itself (CheckpointError, UsageError), so every module can raise them all."""
import sys

from model_utils import CheckpointError, UsageError


class DataError(ValueError):
    """A problem with the dataset on disk; the message names the file and says what is wrong."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says why and what was kept."""


class ExportError(RuntimeError):
    """An export that cannot be written or does not match the model; the message names the file."""


class ModelError(ValueError):
    """An unknown model, or backbone weights that cannot be had or do not fit; the message says which."""


USER_ERRORS = (DataError, CheckpointError, TrainingError, ExportError, ModelError, UsageError)


def check_flags(args, rules):
    """Raise UsageError for the first flag that breaks its rule. ``rules``: (flag, test of its value, what the
    value must be), e.g. ``("--epochs", lambda v: v >= 1, "at least 1")``; a flag whose value is None (not
    given) is not tested."""
    for flag, ok, must in rules:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(ok(v) for v in values):
            raise UsageError(f"{flag} {' '.join(map(str, values))}: must be {must}")


def at_least(flag, n, why=""):
    """The check_flags rule "``flag`` must be ``n`` or more" (``why``, if given, is said after it)."""
    must = "0 or more" if n == 0 else f"at least {n}"
    return flag, (lambda v: v >= n), f"{must} ({why})" if why else must


def one_line(text):
    """The first line of an exception's text (some libraries' messages run over many lines)."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def run_cli(main, parser):
    """Run ``main(parser.parse_args())``. A user error, or a file that cannot be read or written (the OSError
    names it), becomes one line on stderr and exit status 1, never a traceback."""
    try:
        main(parser.parse_args())
    except USER_ERRORS as e:
        sys.exit(f"error: {one_line(e)}")
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or one_line(e)}")
