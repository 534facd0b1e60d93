"""Training and validation data held on the device: the decoded split as uint8 tensors in device memory, and the
training augmentation (seglib/annotations.py) run there, from the same per-sample seeds as the loader.

At batch 4 a fast GPU trains faster than loader workers can decode-free augment on the CPU. Here the sampler's
keys ``(index, seed, size, flip)`` draw exactly the flip, crop box and colour factors that torchvision's
transforms draw under that seed (``draw_params``), and the pixels are made on the device in float, rounded to
integers at the same points as torchvision's uint8 kernels, so they match the loader's to within interpolation
rounding. A resumed run therefore replays the same augmentation, and no worker count is involved.
"""
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from seglib.annotations import CROP_SCALE, JITTER, build_loader, crop_ratio

DEVICE_SHARE = 0.25  # the decoded data may take at most this share of a GPU's memory (see data_on_device)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's operations, in its numbering


@dataclass(frozen=True)
class SampleParams:
    """One sample's augmentation: mirrored or not, the crop box (top, left, height, width) in the (mirrored)
    native image, and the colour operations in the order they run with their factors (by operation)."""
    flip: bool
    box: tuple
    order: tuple = ()
    factors: tuple = ()


def _uniform(low, high):
    return float(torch.empty(1).uniform_(low, high).item())


def _crop_box(height, width, out_hw):
    """RandomResizedCrop's box of a (height, width) image for an output of ``out_hw``: ten tries of a random
    area and aspect ratio, then the central crop (the same draws, in the same order, as torchvision's)."""
    ratio = crop_ratio(*out_hw)
    log_ratio = torch.log(torch.tensor(ratio))
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(CROP_SCALE[0], CROP_SCALE[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(seed, native_hw, out_hw, augment, random_flip):
    """The augmentation ``train_transform(*out_hw, augment, random_flip)`` applies to a ``native_hw`` image when
    run under ``torch.manual_seed(seed)``, drawn in a forked RNG (the global one is left as it was)."""
    box = (0, 0, *native_hw)
    if augment == "none":
        return SampleParams(False, box)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed reseeds every GPU too
        flip = random_flip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip: no flip when rand >= p
        if augment == "flip":
            return SampleParams(flip, box)
        box = _crop_box(*native_hw, out_hw)
        order = tuple(torch.randperm(4).tolist())
        b, c, s, h = (JITTER[k] for k in ("brightness", "contrast", "saturation", "hue"))
        factors = (_uniform(max(0.0, 1 - b), 1 + b), _uniform(max(0.0, 1 - c), 1 + c),
                   _uniform(max(0.0, 1 - s), 1 + s), _uniform(-h, h))
    return SampleParams(flip, box, order, factors)


# --------------------------------------------------------------------------------------------------- pixels
# Images below are float (3, H, W) tensors holding integers in [0, 255]: every operation ends where torchvision's
# uint8 kernel converts back to uint8 (truncating, or rounding after a resize).

def resize_image(image, out_hw):
    """Bilinear, antialiased resize of a (3, H, W) image, rounded to integers (torchvision's Resize)."""
    if tuple(image.shape[-2:]) == tuple(out_hw):
        return image.float()
    x = F.interpolate(image[None].float(), size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return x[0].round_().clamp_(0, 255)


def resize_mask(mask, out_hw):
    """Nearest-neighbour resize of an (H, W) uint8 class map (torchvision's, for masks)."""
    if tuple(mask.shape) == tuple(out_hw):
        return mask
    return F.interpolate(mask[None, None], size=out_hw, mode="nearest")[0, 0]


def _gray(image):
    r, g, b = image.unbind(0)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()[None]  # (1, H, W)


def _blend(image, other, ratio):
    return image.mul(ratio).add_(other, alpha=1.0 - ratio).clamp_(0, 255).floor_()


def _hsv(rgb):
    """(3, H, W) RGB in [0, 1] -> (hue in [0, 1), saturation, value), each (H, W)."""
    r, g, b = rgb.unbind(0)
    minc, maxc = torch.aminmax(rgb, dim=0)
    gray = maxc == minc
    ones = torch.ones_like(maxc)
    s = (maxc - minc) / torch.where(gray, ones, maxc)
    rc, gc, bc = ((maxc[None] - rgb) / torch.where(gray, ones, maxc - minc)[None]).unbind(0)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, rc.add(2.0).sub_(bc), gc.add(4.0).sub_(rc)))
    return h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0), s, maxc


_RGB_FROM_VPQT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # sector -> (v, p, q, t) picks
_PICKS = {}  # device -> the table above as a tensor, so no host copy per image


def _rgb(h, s, v):
    """hue, saturation, value (H, W) -> (3, H, W) RGB in [0, 1]."""
    h6 = h.mul(6)
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    sector = sector.to(torch.int64).remainder_(6)
    q = (1.0 - s * f).mul_(v).clamp_(0.0, 1.0)
    t = (s * f).add_(1.0 - s).mul_(v).clamp_(0.0, 1.0)
    p = (1.0 - s).mul_(v).clamp_(0.0, 1.0)
    if v.device not in _PICKS:
        _PICKS[v.device] = torch.tensor(_RGB_FROM_VPQT, dtype=torch.int64, device=v.device)
    return torch.stack((v, p, q, t)).gather(0, _PICKS[v.device][:, sector])


def adjust_hue(image, factor):
    """Rotate the hue by ``factor`` turns (torchvision's adjust_hue on a uint8 image)."""
    h, s, v = _hsv(image / 255.0)
    rgb = _rgb(h.add_(factor).remainder_(1.0), s, v)
    return rgb.mul_(255.999).floor_()


def adjust_colour(image, op, factor):
    """One of ColorJitter's operations (BRIGHTNESS, CONTRAST, SATURATION, HUE) with its factor."""
    if op == BRIGHTNESS:
        return image.mul(factor).clamp_(0, 255).floor_()
    if op == CONTRAST:
        return _blend(image, _gray(image).mean(dim=(-3, -2, -1), keepdim=True), factor)
    if op == SATURATION:
        return _blend(image, _gray(image), factor)
    return adjust_hue(image, factor)


def augment_sample(image, mask, params, out_hw):
    """One training pair, (3, H, W) and (H, W) uint8 on the device, through ``params`` at ``out_hw``: mirror,
    crop, resize, colour. Returns uint8 (3, h, w) and (h, w)."""
    if params.flip:
        image, mask = image.flip(-1), mask.flip(-1)
    top, left, h, w = params.box
    x = resize_image(image[:, top:top + h, left:left + w], out_hw)
    mask = resize_mask(mask[top:top + h, left:left + w], out_hw)
    for op in params.order:
        x = adjust_colour(x, op, params.factors[op])
    return x.to(torch.uint8), mask


# --------------------------------------------------------------------------------------------------- loaders

def decoded_bytes(*datasets):
    """Bytes of the decoded images and masks of SegmentationDatasets (None if one does not cache its images)."""
    if any(d.images is None for d in datasets):
        return None
    return sum(im.nbytes + m.nbytes for d in datasets for im, m in zip(d.images, d.masks))


def data_on_device(choice, device, datasets):
    """Whether to keep ``datasets`` on ``device``, and a line saying why not when asked for (``choice`` True) or
    by default (None: on for CUDA) but impossible. On a GPU the decoded data may take a DEVICE_SHARE of its
    free memory; on the CPU the tensors share the cache's memory."""
    if choice is False or (choice is None and device.type != "cuda"):
        return False, None
    size = decoded_bytes(*datasets)
    if size is None:
        return False, "--data-on-device: the images are not cached in memory; using the data loader"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # what other processes (or this one) already hold is not there
        limit = free * DEVICE_SHARE
        if size > limit:
            return False, (f"--data-on-device: the decoded data ({size / 2**30:.2f} GiB) exceeds a quarter of "
                           f"{device}'s free memory ({limit / 2**30:.2f} GiB); using the data loader")
    elif device.type != "cpu":
        return False, f"--data-on-device: not supported on {device.type}; using the data loader"
    return True, None


def _to_device(dataset, device):
    """The dataset's images as (3, H, W) and masks as (H, W) uint8 tensors on ``device``."""
    images = [torch.from_numpy(im).permute(2, 0, 1).to(device) for im in dataset.images]
    return images, [torch.from_numpy(m).to(device) for m in dataset.masks]


class DeviceTrainLoader:
    """Batches of augmented training pairs made on ``device``: uint8 (B, 3, h, w) images and (B, h, w) masks.

    A stand-in for data_generator.build_loader's training loader: it iterates the same ``sampler`` (an
    EpochSampler: set its epoch, size, flips and skip as for the loader), drops the last partial batch, and
    gives each key the augmentation the loader would (``draw_params``).
    """

    def __init__(self, dataset, sampler, batch_size, device, size, augment, random_flip):
        self.sampler, self.batch_size, self.size = sampler, batch_size, tuple(size)
        self.augment, self.random_flip = augment, random_flip
        self.images, self.masks = _to_device(dataset, device)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def sample(self, key):
        """The pair of one sampler key ``(index, seed, size, flip)``."""
        index, seed, size, flip = key
        image, mask = self.images[index], self.masks[index]
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        out_hw = self.size if size is None else tuple(size)
        params = draw_params(seed, tuple(mask.shape), out_hw, self.augment, self.random_flip)
        return augment_sample(image, mask, params, out_hw)

    def __iter__(self):
        keys = list(self.sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            images, masks = zip(*(self.sample(k) for k in keys[start:start + self.batch_size]))
            yield torch.stack(images), torch.stack(masks)  # (B, 3, h, w), (B, h, w)


class DeviceEvalLoader:
    """Evaluation batches on ``device``, as build_loader's: images resized to ``size`` (uint8 (B, 3, h, w)) and
    the native masks as a list, in ``sampler``'s order."""

    def __init__(self, dataset, sampler, batch_size, device, size):
        self.sampler, self.batch_size, self.size = sampler, batch_size, tuple(size)
        self.images, self.masks = _to_device(dataset, device)

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            picks = order[start:start + self.batch_size]
            images = [resize_image(self.images[i], self.size).to(torch.uint8) for i in picks]
            yield torch.stack(images), [self.masks[i] for i in picks]


def build_loaders(args, train_set, val_set, device, info):
    """The training and validation loaders: the data loader's worker processes, or (--data-on-device) the decoded
    splits in device memory, augmented there. Both iterate the same sampler, so the data is the same."""
    train_loader = build_loader(train_set, args.batch_size, True, args.workers, args.seed, info.rank, info.world_size)
    # validation only resizes 100 images an epoch: two workers keep up, and idle persistent ones cost memory
    val_loader = build_loader(val_set, args.batch_size, False, min(2, args.workers), args.seed, info.rank,
                              info.world_size)
    on_device, why_not = data_on_device(args.data_on_device, device, (train_set, val_set))
    if why_not and info.is_main:
        print(why_not)
    if not on_device:
        return train_loader, val_loader
    size = (args.height, args.width)
    try:
        return (DeviceTrainLoader(train_set, train_loader.sampler, args.batch_size, device, size, args.augment,
                                  args.flips == "random"),
                DeviceEvalLoader(val_set, val_loader.sampler, args.batch_size, device, size))
    except torch.cuda.OutOfMemoryError:  # the free memory shrank after it was weighed (another process)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what was uploaded before the failure is no longer referenced
        if info.is_main:
            print(f"--data-on-device: {device} ran out of memory while the data was copied there; using the data "
                  f"loader")
        return train_loader, val_loader
