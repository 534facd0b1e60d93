"""FLOPs of the registered models, counted by torch.utils.flop_counter on a forward and a backward pass
(benchmark.py's GFLOPs and MFU, and the models figure of curves.py)."""
import math

import torch
from torch.nn import functional as F
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


def model_gflops(name, height, width, n_classes=4):
    """(forward, forward + backward) GFLOPs per image of model ``name``, counted by torch.utils.flop_counter
    (with ``conv_backward_flop`` for the convs' backward) on the ``meta`` device: shapes only, no arithmetic and
    no memory, so counting at 480x640 costs what it costs at 96x128."""
    with torch.device("meta"):
        model = build_model(name, n_classes)
        x = torch.rand(2, 3, height, width)  # 2 images: train-mode BatchNorm needs more than one value per channel
        target = torch.zeros(2, height, width, dtype=torch.long)
    with FlopCounterMode(display=False) as fwd:
        logits = model(x)
    forward = fwd.get_total_flops() / 2
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as bwd:
        F.cross_entropy(logits, target).backward()
    return forward / 1e9, (forward + bwd.get_total_flops() / 2) / 1e9

