"""Released weights: a trained model's weights alone (no optimizer or EMA state), with the config, class names and
training flags that rebuild and score it, in a file named ``<name>-<first 8 hex digits of its SHA-256>.pt`` as
``torch.hub.load_state_dict_from_url(check_hash=True)`` expects; and a model built back from such a file, given
as a path or a URL (hubconf.py, evaluate.py)."""
import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from model_utils import HASH_DIGITS, load_checkpoint, sha256_of
from seglib.errors import CheckpointError, ExportError, ModelError
from seglib.registry import build_model, checkpoint_model, model_from_checkpoint

FORMAT = "drinks-fcn released weights 1"


def release_state(ckpt, source):
    """What a release file holds: the weights the run validated (its EMA where it kept one), the config, the
    class names, the run's flags (a plain dict: the recipe and the split) and where they came from."""
    model = model_from_checkpoint(ckpt, source)
    cfg = dict(ckpt["config"])
    return {"model": model.state_dict(), "config": cfg, "class_names": list(cfg["class_names"]),
            "args": dict(ckpt.get("args", {})), "release": {"format": FORMAT, "source": Path(source).name,
                                                            "epoch": ckpt.get("epoch"), "torch": str(torch.__version__)}}


def release_name(stem, digest):
    """``<stem>-<first HASH_DIGITS hex digits of the SHA-256>.pt``."""
    return f"{stem}-{digest[:HASH_DIGITS]}.pt"


def write_release(state, folder, stem):
    """Write ``state`` to ``folder`` under a temporary name, hash it, then rename it to its hashed name (an
    existing release of the same bytes is replaced by the same bytes). Returns the path."""
    folder = Path(folder)
    tmp = folder / f".{stem}.pt.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        path = folder / release_name(stem, sha256_of(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise ExportError(f"{folder / stem}: cannot write the weights ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_url(weights):
    """Whether ``weights`` names a URL (http, https or file) rather than a local path."""
    return str(weights).split("://", 1)[0] in ("http", "https", "file")


def read_release(weights, model_dir=None):
    """The checkpoint-like dict of a release file at a path or URL. A URL is downloaded once to torch.hub's
    cache (or ``model_dir``); the file, downloaded or cached, is then read as a path is: its SHA-256 checked
    against its name every time, its contents loaded with weights_only."""
    if not is_url(weights):
        return load_checkpoint(weights)
    name = Path(urlparse(str(weights)).path).name
    cached = Path(model_dir or Path(torch.hub.get_dir()) / "checkpoints") / name
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(str(weights), str(cached), progress=True)  # via a temporary name
        except (URLError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: cannot download ({getattr(e, 'reason', e)})") from None
    try:
        state = load_checkpoint(cached)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {str(e).removeprefix(f'{cached}: ')} (cached as {cached})") from None
    return state


def hub_model(name, weights=None, n_classes=4, **options):
    """Model ``name`` in eval mode: from scratch (``n_classes`` outputs, registry options) when ``weights`` is
    None, else built from a release file or checkpoint (path or URL), which must be of that model."""
    if weights is None:
        return build_model(name, n_classes, **options).eval()
    ckpt = read_release(weights)
    saved, _ = checkpoint_model(ckpt["config"])
    if saved != name:
        raise ModelError(f"{weights}: holds weights of {saved}, not {name}; load them with that entry point")
    return model_from_checkpoint(ckpt, weights).eval()

