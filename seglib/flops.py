"""FLOPs of a model or a registered one, counted by torch.utils.flop_counter on a forward and a backward pass
(benchmark.py's GFLOPs and MFU, and the models figure of curves.py), and the bytes a training step moves when
every operator reads its inputs and writes its outputs (the unfused figure of RESULTS.md's roofline)."""
import math

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from seglib.registry import build_model


def conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                       output_padding, groups, output_mask, out_shape=None):
    """FLOPs of a conv's backward: the input gradient and the weight gradient each cost the forward's
    2 * batch * weight size * positions the kernel visits (the output's for a conv, the input's for a transposed
    conv). torch.utils.flop_counter's own formula counts a grouped conv's weight gradient as if the conv were
    dense, ``groups`` times too much, which would inflate a depthwise-separable network (MobileNetV3) many-fold."""
    positions = math.prod((x_shape if transposed else grad_out_shape)[2:])
    one = 2 * grad_out_shape[0] * math.prod(w_shape) * positions
    return one * (int(output_mask[0]) + int(output_mask[1]))


def _cross_entropy_on_class_0(logits):
    target = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long, device=logits.device)  # (B, H, W)
    return F.cross_entropy(logits, target)


def step_gflops(model, height, width, loss=None):
    """(forward, forward + backward) GFLOPs per image of ``model``, built on the ``meta`` device: shapes only, no
    arithmetic and no memory, so counting at 480x640 costs what it costs at 96x128. torch.utils.flop_counter
    counts, with ``conv_backward_flop`` for the convs' backward. ``loss`` turns the output into the scalar the
    backward starts from: cross-entropy against class 0 by default; a part of a model (a backbone alone) can
    pass ``lambda out: out.sum()``."""
    loss = loss or _cross_entropy_on_class_0
    x = torch.rand(2, 3, height, width, device="meta")  # 2 images: train-mode BatchNorm needs more than one value
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    forward = fwd.get_total_flops() / 2
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as bwd:
        loss(out).backward()
    return forward / 1e9, (forward + bwd.get_total_flops() / 2) / 1e9


def model_gflops(name, height, width, n_classes=4):
    """(forward, forward + backward) GFLOPs per image of registered model ``name`` (see ``step_gflops``)."""
    with torch.device("meta"):
        model = build_model(name, n_classes)
    return step_gflops(model, height, width)


def _tensor_bytes(values):
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


def _is_view(func):
    """Whether an aten operator returns a view of an input (no data moved) rather than new or rewritten data."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class ByteCounter(TorchDispatchMode):
    """Counts the bytes each aten operator reads (its tensor arguments) and writes (its tensor results), views
    left out: the traffic of a step in which no two operators share a pass over memory."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _is_view(func):
            self.read += _tensor_bytes((args, kwargs))
            self.written += _tensor_bytes(out)
        return out


def training_gbytes(name, height, width, n_classes=4, dtype=torch.bfloat16):
    """GB per image that a forward and backward pass of model ``name`` reads and writes, unfused, with weights
    and activations in ``dtype`` (what autocast runs the convs in), counted on the ``meta`` device."""
    with torch.device("meta"):
        model = build_model(name, n_classes).to(dtype)
        x = torch.rand(2, 3, height, width, dtype=dtype)
        target = torch.zeros(2, height, width, dtype=torch.long)
    with ByteCounter() as counter:
        F.cross_entropy(model(x), target).backward()
    return (counter.read + counter.written) / 2 / 1e9
