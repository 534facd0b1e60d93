"""What a checkpoint and a released weights file hold, written and read: checkpoints saved under a
temporary name then renamed and loaded with ``weights_only=True`` (a hashed name checked first), the resume state
and the flags a resumed run must keep, the background writer, released weights named by their SHA-256 for
torch.hub, and the book's own Keras HDF5 weights read into the project's FCN."""

import json
import os
import re
import threading
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import numpy as np
import torch

from fcn import build_fcn
from model_utils import rng_state
from seglib.annotations import DEFAULT_CLASS_NAMES
from seglib.files import CheckpointError, ExportError, ModelError, UsageError, read_jsonl, sha256_of
from seglib.registry import DEFAULT_MODEL, SAME_PADDING, build_model, checkpoint_model, model_from_checkpoint, model_options

# ----------------------------------------------------------------------------------------------- checkpoints on disk

CONFIG_KEYS = ("n_classes", "height", "width", "class_names")


HASH_DIGITS = 8  # a released file is named <name>-<first 8 hex digits of its SHA-256>.pt (seglib/checkpoints.py)


HASHED_NAME = re.compile(r"-([0-9a-f]{8,64})\.pt$", re.IGNORECASE)  # the part torch.hub's check_hash reads


def save_checkpoint(state, path):
    """``torch.save`` to a temporary name in the same folder, then rename: a crash or a full disk never leaves half
    a file, and the previous checkpoint stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_name_hash(path):
    """CheckpointError if ``path`` is named ``<name>-<hex digits>.pt`` and its SHA-256 does not begin with them
    (a damaged or altered release); a name without such digits is not checked, as in torch.hub."""
    match = HASHED_NAME.search(Path(path).name)
    if match and not sha256_of(path).startswith(match.group(1).lower()):
        raise CheckpointError(f"{path}: its SHA-256 does not start with the {match.group(1)} in its name "
                              f"(a damaged or altered file); download or export it again")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (``weights_only=True``: plain tensors and containers, no arbitrary objects). A
    released file, named with its hash, is checked against it first."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: is an ONNX file, not a checkpoint (evaluate.py scores it; this needs a .pt)")
    check_name_hash(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' and 'config' entries)")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: its 'config' and 'model' entries are not dicts")
    missing = [k for k in CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{path}: checkpoint config lacks {', '.join(missing)}")
    return ckpt


# -------------------------------------------------------------------------------------- a run's state and its resume

# flags a resumed run must keep (the model's are checked with the model): they change the data, the split or the
# steps; --epochs may change
RESUME_FIXED = ("height", "width", "batch_size", "data_path", "val_fraction", "seed", "split_seed", "limit")


def checkpoint_state(model, optimizer, scaler, args, class_names, epoch, step, best, loss_state, ema=None):
    """Everything ``--resume`` needs, as plain dicts and tensors (loadable with weights_only=True).

    ``epoch`` is the epoch in progress and ``step`` the steps done in it (0 when it has not started). With an
    EMA, its weights are saved too, and evaluation and export use them (seglib.registry.model_from_checkpoint).
    The tensors are the live ones: pass the state through ``host_copy`` before training goes on.
    """
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    return {
        **extra,
        "model": model.state_dict(),
        "config": {"n_classes": len(class_names), "model": args.model,
                   "model_options": model_options(args.model, args), "height": args.height, "width": args.width,
                   "class_names": list(class_names), "same_padding": SAME_PADDING},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_miou": best,
        "loss_state": loss_state.cpu(),
        "rng": rng_state(),
        "args": vars(args),
    }


def host_copy(state):
    """``state`` with every tensor copied to host memory (CPU tensors cloned): a snapshot that training, which
    updates the weights and optimizer moments in place, cannot change while it is written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


class BackgroundWriter:
    """Runs file-writing jobs (checkpoints, figures) one at a time in a thread, so the training loop goes on.

    ``submit`` first waits for the job before it (so files are written in order and at most one snapshot is held
    in memory), then starts the new one. A job's error is raised by the next ``submit`` or ``wait``. Use it as a
    context manager: leaving waits for the last job. ``threaded=False`` runs the jobs at once instead: on a
    CPU the training's threads already use every core, and a job beside them slows them by more than it takes.
    Each checkpoint is still written to a temporary name and renamed (save_checkpoint), so a kill
    at any moment leaves the previous file or the new one.
    """

    def __init__(self, threaded=True):
        self.threaded = threaded
        self._thread, self._error = None, None

    def _run(self, jobs):
        try:
            for job in jobs:
                job()
        except Exception as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._error = e

    def submit(self, *jobs):
        """Wait for the previous jobs, then run ``jobs`` (callables) in order in the background (without
        ``threaded``: here and now)."""
        self.wait()
        if not self.threaded:
            for job in jobs:
                job()
            return
        self._thread = threading.Thread(target=self._run, args=(jobs,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self):
        """Block until the running jobs are done; re-raise the error of one that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.wait()  # the last job's error, if any, is the run's
        elif self._thread is not None:
            self._thread.join()
            self._thread = None
        return False


RESUME_ONLY = ("optimizer", "scaler", "loss_state", "rng")  # what last.pt holds for --resume and best.pt need not


def scoring_state(state):
    """``state`` without what only ``--resume`` needs: the weights (and EMA), config, epoch, score and flags that
    evaluation and export read, a third of the full state's size (Adam keeps two moments per weight)."""
    return {k: v for k, v in state.items() if k not in RESUME_ONLY}


def save_job(state, best_path=None, last_path=None):
    """A job that saves the host snapshot ``state`` atomically: in full to ``last_path`` and without the resume
    state to ``best_path`` (either None: not this epoch)."""
    def job():
        if best_path is not None:
            save_checkpoint(scoring_state(state), best_path)
        if last_path is not None:
            save_checkpoint(state, last_path)
    return job


def trim_metrics(path, epochs_done):
    """Keep only the metrics lines of epochs already in the checkpoint (a crash may have left one more)."""
    if not path.is_file():
        return
    rows, _ = read_jsonl(path)  # a torn last line (a run killed while writing it) goes too
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= epochs_done))
    os.replace(tmp, path)


def check_resume(args, ckpt, path):
    """UsageError if this run's flags would change the run ``path`` holds (see RESUME_FIXED)."""
    saved = ckpt.get("args", {})
    for key in RESUME_FIXED:
        if key not in saved:
            continue
        old, new = saved[key], getattr(args, key)
        if key == "data_path":
            old, new = str(Path(old).resolve()), str(Path(new).resolve())
        if old != new:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {getattr(args, key)}: {path} was trained with {flag} {saved[key]}; resume "
                             f"with the same value (only --epochs may change)")


def load_resumed_weights(model, state, path):
    """Load a resumed run's weights into ``model``; CheckpointError, naming ``path``, when they do not fit it."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in reason[1:3]) or (reason[0] if reason else type(e).__name__)
        raise CheckpointError(f"{path}: its weights do not fit this run's model ({detail})") from None


# -------------------------------------------------------------------------------------------------- released weights
# A trained model's weights alone (no optimizer or EMA state), with the config, class names and training flags that
# rebuild and score it, in a file named <name>-<first 8 hex digits of its SHA-256>.pt as
# torch.hub.load_state_dict_from_url(check_hash=True) expects; given as a path or a URL (hubconf.py, evaluate.py).

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


# ------------------------------------------------------------------------------------------ the book's Keras weights
# The book's repository ships its model as model.save_weights of the whole Keras FCN
# (chapter12-segmentation/weights/ResNet56v2-3layer-drinks-best-iou.h5): per top-level layer a group of arrays. The
# backbone is one nested model (ResNet56v2) whose layers carry Keras's automatic names, conv2d_K and
# batch_normalization_K; the pyramid and the head carry the book's names (conv__layer2, conv_fcn_8, tconv_up_x2,
# ...).
#
# The numbers in the automatic names depend on what the training session built first, so the backbone's layers are
# matched by their order, not by their numbers. TensorFlow 2 names a weight conv2d_3/kernel:0 and Keras 3
# conv2d_3/kernel: both are read. Only arrays are read (h5py datasets): nothing in the file is run or unpickled.

BOOK_SIZE = (480, 640)  # the book trains and scores at 480x640
MAX_ARRAYS = 2000  # the book's 4-layer FCN has 471 weight arrays; a file with far more is not one of its files
_AUTO = re.compile(r"^(conv2d|batch_normalization)(?:_(\d+))?$")


def is_keras_file(path):
    """Whether ``path`` names a Keras HDF5 weights file (by its suffix: .h5 or .hdf5)."""
    return Path(path).suffix.lower() in (".h5", ".hdf5")


def read_arrays(path):
    """{layer name: {weight name: float32 array}} from a Keras HDF5 weights file, nested models flattened.

    CheckpointError, naming the file, when it is not such a file.
    """
    import h5py  # needed only where a Keras file is read

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: Keras weights file not found")
    layers, count = {}, 0
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f  # a whole-model save keeps them one level down
            if "layer_names" not in root.attrs:
                raise CheckpointError(f"{path}: not a Keras HDF5 weights file (no layer_names)")
            for layer in root.attrs["layer_names"]:
                group = root[_text(layer)]
                for name in group.attrs.get("weight_names", []):
                    name = _text(name)
                    data = group[name]
                    count += 1
                    if not isinstance(data, h5py.Dataset) or data.dtype.kind != "f" or count > MAX_ARRAYS:
                        raise CheckpointError(f"{path}: {name} is not a float array of a weights file")
                    parts = name.removesuffix(":0").split("/")
                    if len(parts) < 2:
                        raise CheckpointError(f"{path}: weight name {name!r} names no layer")
                    layers.setdefault(parts[-2], {})[parts[-1]] = np.asarray(data[()], dtype=np.float32)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError ... for a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable Keras HDF5 weights file ({first_line})") from None
    return layers


def _text(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _auto_named(layers, kind):
    """The layers Keras named ``kind``, ``kind_1``, ``kind_2``, ... in the order they were made."""
    found = [(int(m.group(2) or 0), name) for name in layers if (m := _AUTO.match(name)) and m.group(1) == kind]
    return [layers[name] for _, name in sorted(found)]


def book_architecture(layers, path):
    """(depth, n_layers, n_classes) of the book's FCN that ``layers`` (``read_arrays``) holds."""
    convs = _auto_named(layers, "conv2d")
    # the backbone has 1 + 3 * (3n + 1) convs: the stem, and per stage n units of 3 plus one projection
    n = ((len(convs) - 1) // 3 - 1) // 3
    if n < 1 or 1 + 3 * (3 * n + 1) != len(convs):
        raise CheckpointError(f"{path}: not the book's FCN ({len(convs)} automatically named Conv2D layers; the "
                              f"book's ResNet-v2 has 1 + 3 * (3n + 1), e.g. 58 for depth 56)")
    n_layers = 1 + sum(1 for name in layers if re.fullmatch(r"conv__layer\d+", name))
    if "pre_activation" not in layers or "kernel" not in layers["pre_activation"]:
        raise CheckpointError(f"{path}: not the book's FCN (no pre_activation layer, the pixel-wise classifier)")
    return 9 * n + 2, n_layers, int(layers["pre_activation"]["kernel"].shape[2])


def _torch_modules(model):
    """fcn.py's model as the book's layers: (convs, BatchNorms) of the backbone in the order the book's code makes
    them, and {book layer name: conv or BatchNorm} for the pyramid and the head."""
    backbone = model.backbone
    convs, bns = [backbone.stem.conv], [backbone.stem.bn]
    for stage in backbone.stages:
        for unit in stage:
            convs += [unit.conv1, unit.conv2, unit.conv3] + ([unit.shortcut] if hasattr(unit.shortcut, "weight") else [])
            bns += ([unit.bn1] if hasattr(unit.bn1, "weight") else []) + [unit.bn2, unit.bn3]
    bns.append(backbone.final_bn)
    named = {}
    for i, layer in enumerate(model.pyramid.convs):
        named[f"conv__layer{i + 2}"], named[f"bn__layer{i + 2}"] = layer.conv, layer.bn
    for i, layer in enumerate(model.lateral):
        named[f"conv_fcn_{8 * 2 ** i}"], named[f"bn_fcn_{8 * 2 ** i}"] = layer.conv, layer.bn
    for name, layer in zip(("up_x2", "up_x4"), model.up):
        named[f"tconv_{name}"], named[f"bn_{name}"] = layer.conv, layer.bn
    named["pre_activation"] = model.classifier
    return convs, bns, named


def _copy_(module, arrays, name, path):
    """Copy one Keras layer's arrays into ``module`` (a conv, transposed conv or BatchNorm), checking shapes."""
    if isinstance(module, torch.nn.BatchNorm2d):
        pairs = {"gamma": module.weight, "beta": module.bias, "moving_mean": module.running_mean,
                 "moving_variance": module.running_var}
        values = {key: arrays.get(key) for key in pairs}
    else:
        kernel = arrays.get("kernel")
        if kernel is not None and kernel.ndim == 4:
            # Keras keeps (kh, kw, in, out) for Conv2D and (kh, kw, out, in) for Conv2DTranspose; torch keeps
            # (out, in, kh, kw) and (in, out, kh, kw): the same permutation. The classifier is Keras's 1x1
            # Conv2DTranspose held as a 1x1 Conv2d, whose weight is that kernel's (out, in) matrix.
            kernel = kernel.transpose(3, 2, 0, 1)
            if name == "pre_activation":
                kernel = kernel.transpose(1, 0, 2, 3)
        pairs = {"kernel": module.weight, "bias": module.bias}
        values = {"kernel": kernel, "bias": arrays.get("bias")}
    for key, target in pairs.items():
        value = values[key]
        if value is None:
            raise CheckpointError(f"{path}: layer {name} has no {key}")
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: layer {name}'s {key} is {tuple(value.shape)}, the book's FCN here "
                                  f"needs {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def load_keras_fcn(path):
    """fcn.py's FCN (eval mode) holding the weights of the book's Keras FCN in the HDF5 file ``path``; its
    depth, pyramid layers and classes are read from the file. CheckpointError names the file and the problem:
    not such a file, another architecture, or a layer missing."""
    layers = read_arrays(path)
    depth, n_layers, n_classes = book_architecture(layers, path)
    model = build_fcn(n_classes, depth, n_layers).eval()
    convs, bns, named = _torch_modules(model)
    for kind, modules in (("conv2d", convs), ("batch_normalization", bns)):
        found = _auto_named(layers, kind)
        if len(found) != len(modules):
            raise CheckpointError(f"{path}: {len(found)} {kind} layers in the backbone, the book's ResNet{depth}v2 "
                                  f"has {len(modules)}")
        for i, (module, arrays) in enumerate(zip(modules, found)):
            _copy_(module, arrays, f"{kind} number {i + 1}", path)
    for name, module in named.items():
        if name not in layers:
            raise CheckpointError(f"{path}: has no layer {name} (the book's FCN with {n_layers} pyramid layers)")
        _copy_(module, layers[name], name, path)
    return model


def keras_checkpoint(path):
    """A checkpoint dict (as load_checkpoint returns) of the book's Keras FCN in ``path``: its weights and a
    config of the book's run (480x640, the drinks classes)."""
    model = load_keras_fcn(path)
    height, width = BOOK_SIZE
    config = {"n_classes": model.n_classes, "model": DEFAULT_MODEL,
              "model_options": {"depth": model.depth, "n_layers": model.n_layers}, "height": height, "width": width,
              "class_names": list(DEFAULT_CLASS_NAMES[:model.n_classes]), "same_padding": SAME_PADDING,
              "source": f"Keras weights {Path(path).name}"}
    return {"model": model.state_dict(), "config": config}


def load_weights_file(path):
    """The checkpoint dict of ``path``: the book's Keras FCN for a .h5 file, else the project's checkpoint."""
    return keras_checkpoint(path) if is_keras_file(path) else load_checkpoint(path)
