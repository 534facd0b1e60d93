"""The ONNX form of a trained segmenter: export with this project's metadata, and an onnxruntime session that
evaluate.py and benchmark.py call as they call a PyTorch model.

The graph is the inference form of the model: eval mode, every BatchNorm that follows a conv folded into it,
float32. Its input ``images`` is (B, 3, H, W) float32 in [0, 1] (what ``evaluate.to_input`` gives); its outputs
are ``logits`` (B, n_classes, H, W) float32 and ``labels`` (B, H, W) int64, the argmax class map. Batch,
height and width are dynamic, so one file serves any batch and image size.

It is written by the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) at opset 17: that
exporter is the one that handles this model's dynamic height and width on every torch from 2.4 (which has no
other stable exporter) to the newest, where it is deprecated but works. The metadata (``metadata_props``)
holds the class names and the training input size as plain strings, and the whole model config as JSON, so
evaluate.py needs no model flags.
"""
import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from model_utils import inference_model
from seglib.files import CheckpointError

OPSET = 17
INPUT_NAME, OUTPUT_NAMES = "images", ("logits", "labels")
CONFIG_KEY = "fcn_drinks_config"  # marks a file as this project's: the checkpoint's config, as JSON


class _LogitsAndLabels(nn.Module):
    """``model``'s logits and their argmax class map, the two outputs of the exported graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)  # (B, C, H, W)
        return logits, logits.argmax(1)  # (B, C, H, W), (B, H, W)


def export_onnx(model, config, path, train_split=None, source="", opset=OPSET):
    """Write the float32, BatchNorm-folded inference form of ``model`` (on the CPU) to ``path`` as ONNX.

    ``config`` is the checkpoint's config (classes, input size, ...); ``train_split`` the validation fraction
    and seed the model was trained with, so evaluate.py can rebuild the train and val splits. ``path`` is
    written directly: callers that must not leave a half-written file pass a temporary name.
    """
    fast = _LogitsAndLabels(inference_model(model.cpu().eval(), None, channels_last=False))
    example = torch.rand(1, 3, config["height"], config["width"])
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"},
               "labels": {0: "batch", 1: "height", 2: "width"}}
    # torch 2.4 has no ``dynamo`` argument; from 2.9 on the default is the torch.export-based exporter
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(fast, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, **legacy)
    graph = onnx.load(str(path))
    props = {
        CONFIG_KEY: json.dumps(config),
        "class_names": json.dumps(list(config["class_names"])),
        "input_height": str(config["height"]),
        "input_width": str(config["width"]),
        "input": "images: (B, 3, H, W) float32 RGB in [0, 1]; the model was trained at input_height x input_width",
        "train_split": json.dumps(train_split or {}),
        "source": str(source),
    }
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, str(path))
    return path


def read_metadata(path):
    """(config, train_split) from an exported file's metadata; CheckpointError for a file that is not ONNX or
    not this project's."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in graph.metadata_props}
    if CONFIG_KEY not in props:
        raise CheckpointError(f"{path}: not an ONNX model of this project (no '{CONFIG_KEY}' metadata); "
                              f"export a checkpoint with export.py")
    try:
        config = json.loads(props[CONFIG_KEY])
        train_split = json.loads(props.get("train_split", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its '{CONFIG_KEY}' metadata is not valid JSON") from None
    return config, train_split


class OnnxModel:
    """An exported model run by onnxruntime on the CPU, called like the PyTorch model: float32 (B, 3, H, W)
    tensor in, (B, n_classes, H, W) logits tensor out, on the input's device.

    ``config`` and ``train_split`` come from the file's metadata.
    """

    def __init__(self, path, threads=None):
        self.path = Path(path)
        self.config, self.train_split = read_metadata(self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped failures
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: onnxruntime cannot load it ({first_line})") from None

    def run(self, images):
        """float32 numpy (B, 3, H, W) -> numpy logits (B, n_classes, H, W)."""
        return self.session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images})[0]

    def __call__(self, x):
        images = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.run(images)).to(x.device)
