"""torch.hub entry points: each registered model (seglib/registry.py), from scratch or with released weights
(``export.py --format weights``: a file named with its SHA-256, given as a path or a URL), in eval mode.

    import torch
    model = torch.hub.load(".", "fcn_resnet56v2", source="local",
                           weights="weights/fcn-resnet56v2-4layer-drinks/fcn-resnet56v2-4layer-drinks-1a2b3c4d.pt")
    logits = model(images)  # images: (B, 3, H, W) float in [0, 1] -> (B, 4, H, W)

``weights=None`` gives the model from scratch, with ``n_classes`` outputs and the registry's options.
"""
from seglib.checkpoints import hub_model as _hub_model

dependencies = ["torch", "torchvision", "numpy"]


def fcn_resnet56v2(weights=None, n_classes=4, **options):
    """The book's FCN over ResNet-v2 (fcn.py; options depth=56, n_layers=4)."""
    return _hub_model("fcn_resnet56v2", weights, n_classes, **options)


def unet(weights=None, n_classes=4, **options):
    """The classic U-Net of Ronneberger et al. (seglib/unet.py; option base_channels=64)."""
    return _hub_model("unet", weights, n_classes, **options)


def lraspp_mobilenet_v3_large(weights=None, n_classes=4):
    """torchvision's LR-ASPP over MobileNetV3-Large."""
    return _hub_model("lraspp_mobilenet_v3_large", weights, n_classes)


def deeplabv3_mobilenet_v3_large(weights=None, n_classes=4):
    """torchvision's DeepLabV3 over MobileNetV3-Large."""
    return _hub_model("deeplabv3_mobilenet_v3_large", weights, n_classes)


def fcn_resnet50(weights=None, n_classes=4):
    """torchvision's FCN over ResNet-50 (output stride 8)."""
    return _hub_model("fcn_resnet50", weights, n_classes)


def deeplabv3_resnet50(weights=None, n_classes=4):
    """torchvision's DeepLabV3 over ResNet-50 (output stride 8)."""
    return _hub_model("deeplabv3_resnet50", weights, n_classes)
