"""The model registry: every segmentation model the scripts can train, evaluate, export and benchmark.

Each model maps (B, 3, H, W) float images in [0, 1] to (B, n_classes, H, W) logits, for any H and W the
model's strides allow, and offers the same three things the scripts use, so no script branches on the model:

- ``backbone``: the part ``--pretrained-backbone`` loads (the ResNet, MobileNet or U-Net contracting path);
- ``l2_parameters()``: the backbone's conv kernels, which get the book's L2 penalty;
- ``fuse_bn_()``: fold BatchNorm into the convs for inference, in place, in eval mode.

torchvision's segmentation models return a dict (``out``, and ``aux`` when built with an auxiliary head);
``TorchvisionSegmenter`` returns its ``out`` and is built without the auxiliary head, so every model trains on
the same single pixel-wise cross-entropy as the book's FCN.

    python -c "import registry; print(list(registry.MODELS))"
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, segmentation

from fcn import build_fcn
from seglib.files import CheckpointError, ModelError
from seglib.unet import build_unet

DEFAULT_MODEL = "fcn_resnet56v2"


def fold_conv_bn_(module):
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it, in place; returns ``module``.

    torchvision writes the pair two ways: consecutive entries of an ``nn.Sequential`` (MobileNet's
    Conv2dNormActivation, the ASPP, LR-ASPP and FCN heads) and ``convK`` / ``bnK`` siblings applied in that
    order (ResNet's stem and bottlenecks). Each BatchNorm folded becomes an ``nn.Identity``.
    """
    for parent in list(module.modules()):
        names = [name for name, _ in parent.named_children()]
        if isinstance(parent, nn.Sequential):
            pairs = list(zip(names[:-1], names[1:]))
        else:
            pairs = [(name, "bn" + name[4:]) for name in names if name.startswith("conv") and "bn" + name[4:] in names]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            # _BatchNorm: BatchNorm2d and the SyncBatchNorm that train.py --sync-bn converts it to
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return module


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmentation model that returns the logits tensor, its output dict's ``out``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    @property
    def backbone(self):
        """The torchvision backbone (an IntermediateLayerGetter over the ResNet or MobileNet features)."""
        return self.net.backbone

    def forward(self, x):
        return self.net(x)["out"]  # (B, n_classes, H, W): torchvision resizes to the input size

    def l2_parameters(self):
        """The backbone's conv kernels."""
        return [m.weight for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]

    def fuse_bn_(self):
        """Fold BatchNorm into the convs, for inference. Call in eval mode; returns self."""
        fold_conv_bn_(self.net)
        return self


def torchvision_builder(name):
    """A builder of torchvision's ``segmentation.<name>`` from scratch, with no auxiliary head."""
    def build(n_classes):
        net = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=n_classes, aux_loss=False)
        return TorchvisionSegmenter(net)
    return build


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder, the options it takes (with defaults) and its backbone's weights."""

    build: Callable[..., nn.Module]  # build(n_classes, **options)
    about: str
    options: dict = field(default_factory=dict)
    imagenet: object | None = None  # torchvision weights enum of the backbone's ImageNet classifier
    backbone_prefix: str = ""  # prefix of the backbone's keys in that classifier's state_dict
    slug: Callable[[dict], str] | None = None  # the model part of a default run name, from the options


def run_name(name, options):
    """The model part of a default run name, e.g. ``fcn-resnet56v2-4layer`` or ``deeplabv3-resnet50``."""
    spec = get_spec(name)
    return spec.slug(options) if spec.slug else name.replace("_", "-")


MODELS = {
    DEFAULT_MODEL: ModelSpec(build_fcn, "the book's FCN over ResNet-v2 (fcn.py)", {"depth": 56, "n_layers": 4},
                             slug=lambda o: f"fcn-resnet{o['depth']}v2-{o['n_layers']}layer"),
    "unet": ModelSpec(build_unet, "the classic U-Net of Ronneberger et al. (unet.py)", {"base_channels": 64}),
    "lraspp_mobilenet_v3_large": ModelSpec(
        torchvision_builder("lraspp_mobilenet_v3_large"), "torchvision's LR-ASPP over MobileNetV3-Large",
        imagenet=MobileNet_V3_Large_Weights.IMAGENET1K_V1, backbone_prefix="features."),
    "deeplabv3_mobilenet_v3_large": ModelSpec(
        torchvision_builder("deeplabv3_mobilenet_v3_large"), "torchvision's DeepLabV3 over MobileNetV3-Large",
        imagenet=MobileNet_V3_Large_Weights.IMAGENET1K_V1, backbone_prefix="features."),
    "fcn_resnet50": ModelSpec(
        torchvision_builder("fcn_resnet50"), "torchvision's FCN over ResNet-50 (output stride 8)",
        imagenet=ResNet50_Weights.IMAGENET1K_V1),
    "deeplabv3_resnet50": ModelSpec(
        torchvision_builder("deeplabv3_resnet50"), "torchvision's DeepLabV3 over ResNet-50 (output stride 8)",
        imagenet=ResNet50_Weights.IMAGENET1K_V1),
}


def get_spec(name):
    """The registry entry of ``name``; ModelError for a name that is not registered."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return MODELS[name]


def model_options(name, args):
    """The options of model ``name`` as ``args`` (an argparse Namespace) sets them, else their defaults."""
    return {key: getattr(args, key, default) for key, default in get_spec(name).options.items()}


def build_model(name=DEFAULT_MODEL, n_classes=4, **options):
    """Model ``name`` with ``n_classes`` outputs, from scratch; options not given take the registry's defaults."""
    spec = get_spec(name)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ModelError(f"model {name} takes no option {', '.join(sorted(unknown))}")
    return spec.build(n_classes, **{**spec.options, **options})


def read_backbone_weights(name, source):
    """A backbone state_dict for model ``name``: torchvision's ImageNet weights (``source`` "imagenet") or a
    local file of tensors (loaded with weights_only=True). ModelError names the file or URL and the problem."""
    spec = get_spec(name)
    if source == "imagenet":
        if spec.imagenet is None:
            raise ModelError(f"--pretrained-backbone imagenet: torchvision has no ImageNet weights for the backbone "
                             f"of {name}; pass a local state_dict file instead")
        try:
            return spec.imagenet.get_state_dict(progress=True)
        except (URLError, OSError) as e:
            raise ModelError(f"--pretrained-backbone imagenet: cannot download {spec.imagenet.url} "
                             f"({getattr(e, 'reason', e)}); without internet, fetch that file on another machine "
                             f"and pass --pretrained-backbone PATH") from None
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"{path}: pretrained backbone file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: not a readable state_dict ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state_dict (a dict of tensors)")
    return state


def load_backbone_(model, name, state, source="state_dict"):
    """Load ``state`` into ``model.backbone``, in place. ``state`` may be the backbone's own state_dict or its
    classifier's (keys beyond the backbone, e.g. the classifier head's, are ignored). ModelError, naming
    ``source``, when a backbone tensor is missing or has another shape; nothing is loaded then."""
    prefix = get_spec(name).backbone_prefix
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of its {len(own)} tensors missing, e.g. {missing[0]}")
        if wrong:
            k = wrong[0]
            problems.append(f"{len(wrong)} of another shape, e.g. {k} {tuple(state[k].shape)} "
                            f"instead of {tuple(own[k].shape)}")
        raise ModelError(f"{source}: does not fit the backbone of {name} ({'; '.join(problems)})")
    model.backbone.load_state_dict({k: state[k] for k in own})
    return model


def has_ema(ckpt):
    """Whether a checkpoint carries EMA weights (train.py --ema): an ``ema`` entry holding a ``model``."""
    return isinstance(ckpt.get("ema"), dict) and isinstance(ckpt["ema"].get("model"), dict)


def checkpoint_model(cfg):
    """(model name, its options) of a checkpoint's config. A config without a model name was written before the
    registry existed: it is the book's FCN, whose options (depth, n_layers) are then top-level keys."""
    if "model" in cfg:
        return cfg["model"], dict(cfg.get("model_options", {}))
    return DEFAULT_MODEL, {"depth": cfg["depth"], "n_layers": cfg["n_layers"]}


# config["same_padding"] of every checkpoint written since the book's FCN pads its stride-2 convs and transposed
# convs by TensorFlow's 'same' rule, as the book's Keras model does; an FCN checkpoint without it was trained as
# another function (each of those layers one pixel off), which the model no longer computes
SAME_PADDING = "tensorflow"


def check_same_padding(cfg, path="checkpoint"):
    """CheckpointError if ``cfg`` is the config of an FCN checkpoint trained before its TensorFlow padding."""
    if checkpoint_model(cfg)[0] == DEFAULT_MODEL and cfg.get("same_padding") != SAME_PADDING:
        raise CheckpointError(f"{path}: an FCN trained before its stride-2 layers were padded as Keras pads them "
                              f"(TensorFlow's 'same'); these weights would compute another function: train it again")


def model_from_checkpoint(ckpt, path="checkpoint", ema=True):
    """Build the model a checkpoint describes and load its weights: the EMA weights when the run kept an EMA
    (those are the ones it validated) unless ``ema`` is False; CheckpointError if they do not fit."""
    cfg = ckpt["config"]
    weights = ckpt["ema"]["model"] if ema and has_ema(ckpt) else ckpt["model"]
    try:
        name, options = checkpoint_model(cfg)
    except KeyError as e:
        raise CheckpointError(f"{path}: checkpoint config names no model and lacks {e}") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: checkpoint config's model_options is not a dict") from None
    if not isinstance(name, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in options.values()):
        raise CheckpointError(f"{path}: checkpoint config's model {name!r} or its options {options!r} are not a "
                              f"name and whole numbers")
    check_same_padding(cfg, path)
    try:
        with torch.device("meta"):  # no initialisation to throw away (half a second for the FCN's kernels)
            model = build_model(name, cfg["n_classes"], **options)
    except ModelError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model.load_state_dict(weights, assign=True)  # the saved tensors become the model's (strict: all of them)
    except (RuntimeError, ValueError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({first_line})") from None
    return model
