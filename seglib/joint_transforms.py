"""Joint image/mask transforms: training augmentation and the evaluation resize (masks follow the image's
geometry by nearest neighbour; images stay uint8 and are scaled on the device)."""
from torchvision.transforms import v2

AUGMENTATIONS = ("full", "flip", "none")  # see train_transform
CROP_SCALE = (0.4, 1.0)  # share of the image's area a scale-crop keeps
CROP_ASPECT_SPREAD = 0.85  # the crop's aspect ratio lies within the output's, times or divided by this
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}  # ColorJitter's strengths


def crop_ratio(height, width):
    """(min, max) aspect ratio, width / height, of the scale-crop for an output of (height, width)."""
    aspect = width / height
    return aspect * CROP_ASPECT_SPREAD, aspect / CROP_ASPECT_SPREAD


def train_transform(height, width, augment="full", random_flip=True):
    """Joint image/mask transform for training: resize to (height, width), with ``augment``:

    - ``"full"``: horizontal flip, random scale-crop (40-100% of the area) and mild colour jitter;
    - ``"flip"``: horizontal flip only;
    - ``"none"``: the book's plain pipeline, a resize.

    ``random_flip=False`` leaves the flip out (the sampler then decides the flips, see ``--flips alternate``).

    Images stay uint8 (scaled on the device); masks are resized by nearest neighbour (tv_tensors.Mask).
    """
    resize = v2.Resize((height, width), antialias=True)
    if augment == "none":
        return resize
    flip = [v2.RandomHorizontalFlip()] if random_flip else []
    if augment == "flip":
        return v2.Compose([*flip, resize])
    if augment != "full":
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    return v2.Compose([
        *flip,
        v2.RandomResizedCrop((height, width), scale=CROP_SCALE, ratio=crop_ratio(height, width), antialias=True),
        v2.ColorJitter(**JITTER),
    ])


def eval_transform(height, width):
    """Resize the image to the model's input size; the mask is left at native resolution for the metrics."""
    resize = v2.Resize((height, width), antialias=True)
    return lambda image, mask: (resize(image), mask)
