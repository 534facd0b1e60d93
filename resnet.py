"""ResNet-v2 backbone and feature pyramid of chapter 12 of *Advanced Deep Learning with Keras*.

The backbone follows "Identity Mappings in Deep Residual Networks" (He et al., 2016) with bottleneck units,
exactly as the book's Keras code builds it:

- a 3x3 conv of 16 filters with BN-ReLU on the input;
- 3 stages of n bottleneck units each (depth = 9n + 2). Each unit is BN-ReLU-conv 1x1, BN-ReLU-conv 3x3,
  BN-ReLU-conv 1x1, added to the shortcut. Stage 0 keeps the resolution (16 -> 64 channels), stages 1 and 2
  halve it with a stride-2 first 1x1 conv and double the channels (128, then 256);
- a final BN-ReLU. The output is 1/4 of the input size with 256 channels.

The feature pyramid turns that map into ``n_layers + 1`` levels: the map itself (1/4), its 2x2 average pool
(1/8), then ``n_layers - 1`` 3x3 stride-2 conv-BN-ReLU layers of 512 channels (1/16, 1/32, ...). Every conv
and transposed conv with a stride of 2 and a kernel above 1 is padded by TensorFlow's 'same' rule, as the book's
Keras layers are (``Conv2dSame``, ``ConvTranspose2d``): with the same weights, the same function.

Keras defaults that matter are reproduced: he_normal conv kernels (truncated normal, std sqrt(2 / fan_in)),
zero biases, BatchNorm momentum 0.99 (PyTorch 0.01) and epsilon 1e-3. The ResNet's conv kernels carry the
book's L2 penalty of 1e-4; ``ResNetV2.l2_parameters()`` returns them so a trainer can apply it.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN_MOMENTUM = 0.01  # Keras momentum 0.99: running = 0.99 * running + 0.01 * batch
BN_EPS = 1e-3  # Keras default epsilon
L2_WEIGHT = 1e-4  # the book's kernel_regularizer=l2(1e-4) on the ResNet's conv kernels

# std of a standard normal truncated to [-2, 2]; Keras divides by it so the kept samples have the target std
_TRUNC_STD = 0.87962566103423978


def batch_norm(channels):
    """BatchNorm2d with the Keras defaults (momentum 0.99, epsilon 1e-3)."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def he_normal_(weight, fan_in=None):
    """Keras he_normal: truncated normal (at 2 std) whose samples have std sqrt(2 / fan_in).

    ``fan_in`` defaults to PyTorch's (dim 1 times the kernel area), which for a transposed conv is its output
    channel count times the kernel area, as in Keras.
    """
    fan_in = weight[0].numel() if fan_in is None else fan_in
    std = (2.0 / fan_in) ** 0.5 / _TRUNC_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def init_keras_(module):
    """Initialise every conv of ``module`` like Keras does: he_normal kernels, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            he_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fuse_conv_bn(conv, bn):
    """``conv`` followed by the eval-mode BatchNorm ``bn``, as one new conv (torch's ``fuse_conv_bn_eval``; a
    transposed conv keeps its output channels in dim 1 of its weight)."""
    return fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))


def same_padding(size, kernel, stride):
    """(before, after) padding of one side of ``size`` under TensorFlow's (and so Keras's) ``padding='same'``.

    The output has ceil(size / stride) entries; the total padding that needs is split with the smaller half
    before: an even side under a 3x3 stride-2 conv gets 0 before and 1 after, an odd one 1 and 1. Written
    without ``max`` and branches, so ONNX export traces it as a function of the input size.
    """
    total = kernel - stride + (-size) % stride  # = (ceil(size / stride) - 1) * stride + kernel - size
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` padded as Keras's ``Conv2D(padding='same')``, also where the stride is 2 and the two sides
    get unequal padding (PyTorch's symmetric padding would shift every output by one input pixel)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, bias=True):
        if kernel_size < stride:
            raise ValueError(f"kernel_size {kernel_size} < stride {stride}: 'same' would need negative padding")
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=0, bias=bias)

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        return super().forward(F.pad(x, (left, right, top, bottom)))


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` as Keras's ``Conv2DTranspose(padding='same')``: the output is exactly ``stride``
    times the input, cut from the full transposed conv as TensorFlow cuts it, the smaller half of the excess
    ``kernel_size - stride`` first. For a 3x3 stride-2 kernel that keeps the first 2H x 2W (the last row and
    column go), where ``padding=1, output_padding=1`` would keep the last ones.

    An odd excess cannot be cut by torch's symmetric padding alone. A zero row and column before the input move
    the full output down and right by ``stride``, so a padding of ``stride`` more cuts what TensorFlow cuts and
    output_padding makes up the end: the output comes out at its size, with no slice to copy (oneDNN's CPU
    kernels are also 5x slower when the output has odd sides, as the uncut one has).

    When training, the bias is added as a separate op (same parameters and result): on the CPU, PyTorch's
    oneDNN transposed-conv backward reduces the bias gradient ~50x slower than a plain sum (0.4 s of a 2 s step
    at 240x320, batch 4); the gradient of a separate add is that plain sum.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, bias=True):
        excess = kernel_size - stride
        if excess < 0:
            raise ValueError(f"kernel_size {kernel_size} < stride {stride}: 'same' would need a wider output")
        self.shift = excess % 2  # 1: pad a zero row and column before the input
        padding = excess // 2 + self.shift * stride
        super().__init__(in_ch, out_ch, kernel_size, stride, padding=padding,
                         output_padding=self.shift * (stride - 1), bias=bias)

    def forward(self, x):
        if self.shift:
            x = F.pad(x, (1, 0, 1, 0))  # (B, C, H + 1, W + 1)
        if self.bias is None or not (torch.is_grad_enabled() and self.bias.requires_grad):
            return super().forward(x)  # no bias gradient to compute: the fused bias is faster
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)  # (B, C, stride * H, stride * W)
        return y + self.bias.to(y.dtype).view(1, -1, 1, 1)  # cast: under autocast y is bf16, the bias float32


class ConvBNReLU(nn.Module):
    """conv-BN-ReLU, the book's ``conv_layer`` / ``tconv_layer`` (conv with bias, as Keras builds it)."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, transposed=False):
        super().__init__()
        if transposed:  # Keras Conv2DTranspose(padding="same"): the output is exactly stride times the input
            self.conv = ConvTranspose2d(in_ch, out_ch, kernel_size, stride)
        elif stride > 1 and kernel_size > 1:  # Keras Conv2D(padding="same"), padded as TensorFlow pads it
            self.conv = Conv2dSame(in_ch, out_ch, kernel_size, stride)
        else:  # stride 1, odd kernel: 'same' is symmetric
            self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2)
        self.bn = batch_norm(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))

    def fuse_bn_(self):
        """Fold the BatchNorm into the conv for inference (call in eval mode)."""
        self.conv = fuse_conv_bn(self.conv, self.bn)
        self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """Pre-activation bottleneck unit: BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1, plus the shortcut.

    ``preact=False`` drops the first BN-ReLU (the network's very first unit, whose input is already
    BN-ReLU'd by the stem). ``project=True`` gives the 1x1 projection shortcut (no BN) of a stage's first unit.
    The stride, when 2, sits in the first 1x1 conv and in the projection, as in the book.
    """

    def __init__(self, in_ch, mid_ch, out_ch, stride=1, preact=True, project=False):
        super().__init__()
        self.bn1 = batch_norm(in_ch) if preact else nn.Identity()
        self.relu1 = nn.ReLU(inplace=True) if preact else nn.Identity()  # in place on bn1's output, not on x
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, stride)
        self.bn2 = batch_norm(mid_ch)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, 1, padding=1)
        self.bn3 = batch_norm(mid_ch)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride) if project else nn.Identity()

    def forward(self, x):
        y = self.conv1(self.relu1(self.bn1(x)))  # (B, mid, H/s, W/s)
        y = self.conv2(self.relu2(self.bn2(y)))
        y = self.conv3(self.relu3(self.bn3(y)))  # (B, out, H/s, W/s)
        return y.add_(self.shortcut(x))  # in place: conv3's backward does not need its output

    def fuse_bn_(self):
        """Fold bn2 into conv1 and bn3 into conv2 (bn1 follows a residual sum and stays)."""
        self.conv1 = fuse_conv_bn(self.conv1, self.bn2)
        self.conv2 = fuse_conv_bn(self.conv2, self.bn3)
        self.bn2 = nn.Identity()
        self.bn3 = nn.Identity()

    def conv_weights(self):
        """The unit's conv kernels (the L2-regularised parameters)."""
        convs = [self.conv1, self.conv2, self.conv3]
        if isinstance(self.shortcut, nn.Conv2d):
            convs.append(self.shortcut)
        return [c.weight for c in convs]


def n_units_for_depth(depth):
    """Bottleneck units per stage for a ResNet-v2 of ``depth`` = 9n + 2 layers."""
    if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9 != 0:
        raise ValueError(f"depth must be 9n + 2 with n >= 1 (11, 20, 29, 38, 47, 56, ..., 110, ...), got {depth!r}")
    return (depth - 2) // 9


class ResNetV2(nn.Module):
    """The book's ResNet-v2 backbone: (B, 3, H, W) -> (B, 256, ceil(H/4), ceil(W/4))."""

    out_channels = 256

    def __init__(self, depth=56):
        super().__init__()
        n = n_units_for_depth(depth)
        self.depth = depth
        self.stem = ConvBNReLU(3, 16, 3)
        stages = []
        in_ch = 16  # channels entering the stage; also its units' middle width
        for stage in range(3):
            out_ch = in_ch * 4 if stage == 0 else in_ch * 2
            stride = 1 if stage == 0 else 2
            units = [Bottleneck(in_ch, in_ch, out_ch, stride, preact=stage > 0, project=True)]
            units += [Bottleneck(out_ch, in_ch, out_ch) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.final_bn = batch_norm(in_ch)
        self.final_relu = nn.ReLU(inplace=True)
        init_keras_(self)

    def forward(self, x):
        x = self.stem(x)  # (B, 16, H, W)
        for stage in self.stages:
            x = stage(x)  # (B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, W/4)
        return self.final_relu(self.final_bn(x))

    def l2_parameters(self):
        """The conv kernels that carry the book's L2 penalty (1e-4): every conv of the ResNet, no biases."""
        params = [self.stem.conv.weight]
        for stage in self.stages:
            for unit in stage:
                params += unit.conv_weights()
        return params


class FeaturePyramid(nn.Module):
    """The book's features pyramid over the backbone's 1/4 map: ``n_layers + 1`` levels.

    Level 0 is the input map (1/4), level 1 its 2x2 average pool (1/8), then ``n_layers - 1`` 3x3 stride-2
    conv-BN-ReLU layers of 512 channels (1/16, 1/32, 1/64, ...).
    """

    def __init__(self, in_channels=256, n_layers=4, channels=512):
        super().__init__()
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an integer >= 1 (1, 2, 3, 4, ...), got {n_layers!r}")
        # ceil_mode keeps the last row/column of odd-sized maps instead of dropping it
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        convs, ch = [], in_channels
        for _ in range(n_layers - 1):
            convs.append(ConvBNReLU(ch, channels, 3, stride=2))
            ch = channels
        self.convs = nn.ModuleList(convs)
        self.level_channels = [in_channels, in_channels] + [channels] * (n_layers - 1)
        init_keras_(self)

    def forward(self, x):
        levels = [x, self.pool(x)]  # (B, 256, H/4, W/4), (B, 256, H/8, W/8)
        for conv in self.convs:
            levels.append(conv(levels[-1]))  # (B, 512, H/16, W/16), ...
        return levels


def zero_init_residual_(model):
    """Zero the last conv kernel of every bottleneck unit in ``model``, so each unit starts as the identity.

    The airbench/Goyal et al. trick zeroes the last BatchNorm scale of a unit; in a pre-activation unit that BN
    feeds a ReLU, whose gradient at 0 is 0, so the zeroed scale would never train. A zero conv3 kernel still
    gets a gradient (timm's ``zero_init_last`` for pre-activation units does the same). Returns the number of
    units zeroed.
    """
    units = [unit for unit in model.modules() if isinstance(unit, Bottleneck)]
    for unit in units:
        nn.init.zeros_(unit.conv3.weight)
    return len(units)

