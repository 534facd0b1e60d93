"""The classic U-Net of Ronneberger, Fischer and Brox (2015), "U-Net: Convolutional Networks for Biomedical
Image Segmentation", for images of any size.

A contracting path of four 2x2 max-pool steps, each level two 3x3 convs (64, 128, 256, 512, then 1024 channels
at the bottom), and an expanding path that upsamples with 2x2 stride-2 transposed convs, concatenates the
contracting path's map of the same level and applies two 3x3 convs again; a 1x1 conv classifies each pixel.
As in today's common U-Nets, and unlike the paper, the 3x3 convs are padded (the output has the input's size)
and each is followed by BatchNorm before its ReLU. When a size is odd, the pooled map is floor-sized, and the
upsampled map is zero-padded on its bottom and right to the size of the map it joins.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


def double_conv(in_ch, out_ch):
    """Two (3x3 conv, BatchNorm, ReLU) layers; the convs have no bias (the BatchNorm has one)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """The contracting path: (B, 3, H, W) -> a list of maps at 1, 1/2, 1/4, 1/8 and 1/16 of the input size."""

    def __init__(self, in_ch=3, base_channels=64, levels=4):
        super().__init__()
        chans = [base_channels * 2 ** i for i in range(levels + 1)]  # 64, 128, 256, 512, 1024
        self.blocks = nn.ModuleList([double_conv(in_ch, chans[0])]
                                    + [double_conv(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.channels = chans

    def forward(self, x):
        feats = [self.blocks[0](x)]  # (B, 64, H, W)
        for block in self.blocks[1:]:
            feats.append(block(F.max_pool2d(feats[-1], 2)))  # (B, 2C, floor(h/2), floor(w/2))
        return feats


class Up(nn.Module):
    """One expanding step: upsample x2, pad to the skip map's size, concatenate it, two 3x3 convs."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = double_conv(2 * out_ch, out_ch)

    def forward(self, x, skip):
        x = self.up(x)  # (B, C/2, 2h, 2w)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]  # 0 or 1: the pooling floored
        x = F.pad(x, (0, dw, 0, dh))
        return self.conv(torch.cat([skip, x], dim=1))  # (B, C/2, H_skip, W_skip)


class UNet(nn.Module):
    """U-Net: (B, 3, H, W) float images -> (B, n_classes, H, W) logits, for any H, W of 16 or more."""

    def __init__(self, n_classes=4, base_channels=64):
        super().__init__()
        self.n_classes, self.base_channels = n_classes, base_channels
        self.backbone = Encoder(3, base_channels)
        chans = self.backbone.channels
        self.ups = nn.ModuleList(Up(a, b) for a, b in zip(chans[:0:-1], chans[-2::-1]))
        self.classifier = nn.Conv2d(chans[0], n_classes, 1)

    def forward(self, x):
        feats = self.backbone(x)
        y = feats[-1]  # (B, 16 * base_channels, H/16, W/16)
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            y = up(y, skip)
        return self.classifier(y)  # (B, n_classes, H, W)

    def l2_parameters(self):
        """The contracting path's conv kernels: where the book's FCN has its L2 penalty, its backbone."""
        return [m.weight for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]

    def fuse_bn_(self):
        """Fold each BatchNorm into the conv before it, for inference. Call in eval mode; returns self."""
        for m in self.modules():
            if isinstance(m, nn.Sequential):
                for i in range(len(m) - 1):
                    if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.modules.batchnorm._BatchNorm):
                        m[i] = fuse_conv_bn_eval(m[i], m[i + 1])
                        m[i + 1] = nn.Identity()
        return self


def build_unet(n_classes=4, base_channels=64):
    """The classic U-Net with ``base_channels`` channels at the first level (the paper: 64)."""
    return UNet(n_classes, base_channels)
