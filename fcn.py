"""Fully Convolutional Network of chapter 12 of *Advanced Deep Learning with Keras*, in PyTorch.

A ResNet-v2 backbone (resnet.py) feeds a feature pyramid. Every pyramid level but the first goes through a 3x3
conv-BN-ReLU to 256 channels and is resized bilinearly to exactly the size of the 1/4 map, then all levels are
concatenated, upsampled x2 twice by 3x3 stride-2 transposed conv-BN-ReLU layers (cut as Keras's 'same' cuts
them) and classified per pixel by a 1x1 conv (the book's 1x1 transposed conv). Unlike the book's fixed x2, x4,
x8 upsampling, the resize targets the 1/4 map's size, so any input of 32x32 or more works, 480x640 with 4
pyramid layers included; where the book's model builds, both compute the same. The model returns logits
(softmax is in the loss).
``python summary.py`` prints its shapes and parameter counts, as the book's ``model.summary()``.
"""
import torch
from torch import nn
from torch.nn import functional as F

from resnet import ConvBNReLU, FeaturePyramid, ResNetV2, he_normal_, init_keras_

HEAD_CHANNELS = 256


class FCN(nn.Module):
    """FCN over a ResNet-v2 feature pyramid: (B, 3, H, W) float images -> (B, n_classes, H, W) logits."""

    def __init__(self, n_classes=4, depth=56, n_layers=4):
        super().__init__()
        self.n_classes, self.depth, self.n_layers = n_classes, depth, n_layers
        self.backbone = ResNetV2(depth)
        self.pyramid = FeaturePyramid(ResNetV2.out_channels, n_layers)
        self.lateral = nn.ModuleList(ConvBNReLU(ch, HEAD_CHANNELS, 3) for ch in self.pyramid.level_channels[1:])
        concat_ch = ResNetV2.out_channels + HEAD_CHANNELS * len(self.lateral)
        self.up = nn.Sequential(
            ConvBNReLU(concat_ch, HEAD_CHANNELS, 3, stride=2, transposed=True),
            ConvBNReLU(HEAD_CHANNELS, HEAD_CHANNELS, 3, stride=2, transposed=True),
        )
        # the book's classifier is a 1x1 Conv2DTranspose: the same function as this 1x1 conv, but Keras takes a
        # transposed conv's fan-in from its output channels, so he_normal draws it with std sqrt(2 / n_classes)
        self.classifier = nn.Conv2d(HEAD_CHANNELS, n_classes, 1)
        init_keras_(self.lateral)
        init_keras_(self.up)
        he_normal_(self.classifier.weight, fan_in=n_classes)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        height, width = x.shape[-2:]
        levels = self.pyramid(self.backbone(x))  # [(B, 256, H/4, W/4), (B, 256, H/8, W/8), (B, 512, H/16, W/16), ...]
        main = levels[0]
        size = main.shape[-2:]
        feats = [main]
        for conv, level in zip(self.lateral, levels[1:]):
            # resize to the 1/4 map's exact size: a fixed x2^k factor breaks when H/64 is not whole
            feats.append(F.interpolate(conv(level), size=size, mode="bilinear", align_corners=False))
        x = torch.cat(feats, dim=1)  # (B, 256 * (n_layers + 1), H/4, W/4)
        x = self.up(x)  # (B, 256, 4 * ceil(H/4), 4 * ceil(W/4))
        logits = self.classifier(x)  # (B, n_classes, 4 * ceil(H/4), 4 * ceil(W/4))
        # stride-2 convs are anchored at the top-left pixel, so cropping the overhang keeps alignment
        return logits[..., :height, :width]

    def l2_parameters(self):
        """Parameters with the book's L2 penalty of 1e-4: the ResNet's conv kernels (not the pyramid's or head's)."""
        return self.backbone.l2_parameters()

    def fuse_bn_(self):
        """Fold every BatchNorm that follows a conv into it, for inference. Call in eval mode; returns self."""
        for m in list(self.modules()):
            if hasattr(m, "fuse_bn_") and m is not self:
                m.fuse_bn_()
        return self


def build_fcn(n_classes=4, depth=56, n_layers=4):
    """The book's FCN: ResNet-v2 of ``depth`` (9n + 2), a pyramid of ``n_layers`` layers, ``n_classes`` outputs."""
    return FCN(n_classes, depth, n_layers)


def count_parameters(model):
    """(trainable parameters, BatchNorm running-statistic values) of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    running = sum(m.running_mean.numel() + m.running_var.numel()
                  for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return trainable, running
