"""The book's own trained FCN in PyTorch: a Keras HDF5 weights file read into fcn.py's model.

The book's repository ships its model as ``model.save_weights`` of the whole Keras FCN
(chapter12-segmentation/weights/ResNet56v2-3layer-drinks-best-iou.h5). That file keeps, per top-level layer, a
group of arrays: the backbone is one nested model (``ResNet56v2``) whose layers carry Keras's automatic names,
``conv2d_K`` and ``batch_normalization_K``; the pyramid and the head carry the book's names (``conv__layer2``,
``conv_fcn_8``, ``tconv_up_x2``, ``pre_activation``, ...).

The numbers in the automatic names depend on what the training session built before the model, so the
backbone's layers are matched by their order (the order the book's code makes them), not by their numbers.
TensorFlow 2 names a weight ``conv2d_3/kernel:0`` and Keras 3 ``conv2d_3/kernel``: both are read. Only arrays
are read (h5py datasets): nothing in the file is run or unpickled.

    python evaluate.py --weights ResNet56v2-3layer-drinks-best-iou.h5
"""
import re
from pathlib import Path

import numpy as np
import torch

from fcn import build_fcn
from model_utils import load_checkpoint
from seglib.errors import CheckpointError
from seglib.registry import DEFAULT_MODEL, SAME_PADDING
from seglib.via import DEFAULT_CLASS_NAMES

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
