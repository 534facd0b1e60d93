"""The drinks dataset from disk to batches: VGG Image Annotator files (VIA 1 and 2; polygons,
rectangles, circles, ellipses) checked where they are read and rasterised into (H, W) uint8 class maps, the
book's pickled one-hot masks, the seeded validation split, the host-side augmentation applied jointly to an image
and its mask (torchvision v2), and the dataset, samplers and loaders that feed training and evaluation."""

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from seglib.download import ANNOTATION_FILES, DEFAULT_DATA_PATH
from seglib.files import DataError, UsageError, image_size, read_image

# ------------------------------------------------------------------------------------------- VIA files to class maps

DEFAULT_CLASS_NAMES = ("background", "Water", "Soda", "Juice")


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: annotation file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None


def _class_attribute(via, path):
    """(region attribute name, class names) from VIA's ``_via_attributes``, defaulting to the drinks classes."""
    attributes = via.get("_via_attributes")
    region_attrs = attributes.get("region") if isinstance(attributes, dict) else None
    if not isinstance(region_attrs, dict) or not region_attrs:
        return "Name", list(DEFAULT_CLASS_NAMES)
    key = "Name" if "Name" in region_attrs else next(iter(region_attrs))
    options = region_attrs[key].get("options") if isinstance(region_attrs[key], dict) else None
    if not options:
        return key, list(DEFAULT_CLASS_NAMES)
    if not isinstance(options, dict):
        raise DataError(f"{path}: class options of attribute {key!r} must be an object of id -> name")
    try:
        ids = sorted(int(k) for k in options)
    except ValueError:
        raise DataError(f"{path}: class options of attribute {key!r} must be integer ids, got {list(options)}") from None
    if ids != list(range(1, len(ids) + 1)):
        raise DataError(f"{path}: class ids of attribute {key!r} must be 1..N, got {ids}")
    return key, ["background"] + [str(options[str(i)]) for i in ids]


def read_via(path, problems=None):
    """Parse a VIA 2 project or annotation export.

    Returns ``(class_names, entries)`` where entries is a list of ``(filename, regions)`` in file order, each
    region a ``(shape_attributes, class_id)`` pair. Raises DataError naming the file and entry on bad input;
    with a ``problems`` list, a bad entry or region is appended to it as a message and left out instead.
    """
    via = _read_json(path)
    if not isinstance(via, dict):
        raise DataError(f"{path}: expected a VIA JSON object, got {type(via).__name__}")
    metadata = via.get("_via_img_metadata", via)  # a project file, or the bare "export as json" dict
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: _via_img_metadata must be an object of entries, got {type(metadata).__name__}")
    key, class_names = _class_attribute(via, path)
    entries = []
    for entry_key, item in metadata.items():
        if entry_key.startswith("_via_"):
            continue
        try:
            if not isinstance(item, dict) or not isinstance(item.get("filename"), str) or not item["filename"]:
                raise DataError(f"{path}: entry {entry_key!r} has no 'filename'")
            regions = [_read_region(region, key, class_names, f"{path}: entry {item['filename']!r} region {i}",
                                    problems) for i, region in enumerate(_regions(item, path))]
        except DataError as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        entries.append((item["filename"], [r for r in regions if r is not None]))
    if not entries and not problems:
        raise DataError(f"{path}: no annotated images in the file")
    return class_names, entries


def _regions(item, path):
    """An entry's regions as a list: VIA 2 writes a list, VIA 1 an object keyed "0", "1", ..."""
    regions = item.get("regions") or []
    if isinstance(regions, dict):
        regions = list(regions.values())
    if not isinstance(regions, list):
        raise DataError(f"{path}: entry {item['filename']!r}: regions must be a list, got {type(regions).__name__}")
    return regions


def _read_region(region, key, class_names, where, problems=None):
    """``(shape_attributes, class_id)`` of one VIA region; a bad one raises, or with ``problems`` is noted there
    and gives None."""
    try:
        attributes = region.get("region_attributes") if isinstance(region, dict) else None
        label = attributes.get(key) if isinstance(attributes, dict) else None
        try:
            class_id = int(label)
        except (TypeError, ValueError):
            class_id = -1
        if not 1 <= class_id < len(class_names):
            raise DataError(f"{where}: unknown class {label!r} (expected one of 1..{len(class_names) - 1})")
        shape = region.get("shape_attributes") or {}
        _check_shape(shape, where)
    except DataError as e:
        if problems is None:
            raise
        problems.append(str(e))
        return None
    return shape, class_id


# the numbers each shape is drawn from (an ellipse's theta is optional)
SHAPE_NUMBERS = {"polygon": (), "rect": ("x", "y", "width", "height"), "circle": ("cx", "cy", "r"),
                 "ellipse": ("cx", "cy", "rx", "ry")}
RASTERISED_SHAPES = tuple(SHAPE_NUMBERS)
# the drinks polygons have at most 57 points; filling one of 4,000 takes seconds, so more is refused
MAX_POLYGON_POINTS = 1000
MAX_COORDINATE = 1e6  # pixels: beyond it a number is no photo's coordinate (and skimage's fill goes wrong)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= MAX_COORDINATE)


def _check_shape(shape, where):
    """DataError unless ``shape`` is a VIA shape that shape_pixels can fill: a known name and finite numbers."""
    name = shape.get("name") if isinstance(shape, dict) else None
    if name not in RASTERISED_SHAPES:
        raise DataError(f"{where}: shape {name!r} has no area to fill (supported: {', '.join(RASTERISED_SHAPES)})")
    if name == "polygon":
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        for axis, values in (("x", xs), ("y", ys)):
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                raise DataError(f"{where}: polygon's all_points_{axis} must be a list of numbers "
                                f"(each within {MAX_COORDINATE:,.0f} pixels of 0)")
        if len(xs) != len(ys):
            raise DataError(f"{where}: polygon has {len(xs)} x and {len(ys)} y coordinates")
        if not 3 <= len(xs) <= MAX_POLYGON_POINTS:
            raise DataError(f"{where}: polygon has {len(xs)} points, 3 to {MAX_POLYGON_POINTS} are read")
    keys = SHAPE_NUMBERS[name] + (("theta",) if name == "ellipse" and "theta" in shape else ())
    bad = [k for k in keys if not _is_number(shape.get(k))]
    if bad:
        raise DataError(f"{where}: {name} needs a number within {MAX_COORDINATE:,.0f} pixels of 0 for "
                        f"{', '.join(bad)}")


def shape_pixels(shape, height, width):
    """(rows, cols) of the pixels inside a VIA shape, clipped to the image."""
    from skimage import draw

    hw = (height, width)
    name = shape["name"]
    if name == "polygon":
        xs = np.clip(np.asarray(shape["all_points_x"], dtype=float), 0, width - 1)
        ys = np.clip(np.asarray(shape["all_points_y"], dtype=float), 0, height - 1)
        return draw.polygon(ys, xs, shape=hw)
    if name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return draw.polygon([y, y, y + h, y + h], [x, x + w, x + w, x], shape=hw)
    if name == "circle":
        return draw.disk((float(shape["cy"]), float(shape["cx"])), float(shape["r"]), shape=hw)
    # ellipse: VIA's theta is the rotation in radians, counter-clockwise in image coordinates
    return draw.ellipse(float(shape["cy"]), float(shape["cx"]), float(shape["ry"]), float(shape["rx"]), shape=hw,
                        rotation=-float(shape.get("theta", 0.0)))


def rasterise(regions, height, width):
    """(H, W) uint8 class map of VIA regions; later regions overwrite earlier ones, the rest is background."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for shape, class_id in regions:
        rows, cols = shape_pixels(shape, height, width)
        mask[rows, cols] = class_id
    return mask


def check_entry(root, json_path, name, regions):
    """Decode one listed image and fill each of its regions: (class map, or None if the image is broken; problems)."""
    path = root / name
    try:
        image = read_image(path, f"{json_path}: entry {name!r}: {path}")
    except DataError as e:
        return None, [str(e)]
    height, width = image.shape[:2]
    mask, problems = np.zeros((height, width), dtype=np.uint8), []
    for i, (shape, class_id) in enumerate(regions):
        try:
            rows, cols = shape_pixels(shape, height, width)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{json_path}: entry {name!r} region {i}: cannot fill its {shape.get('name')} "
                            f"({type(e).__name__}: {e})")
            continue
        mask[rows, cols] = class_id
    return mask, problems


def read_legacy_masks(path, allow_pickle=False):
    """The book's ``segmentation_train.npy``: a pickled dict filename -> (H, W, n_classes) one-hot uint8.

    Unpickling can run arbitrary code, so this refuses unless ``allow_pickle`` is set.
    Returns ``{filename: (H, W) uint8 class map}``.
    """
    path = Path(path)
    if not allow_pickle:
        raise DataError(f"{path}: the book's .npy masks are a pickle, which can run code when loaded; "
                        f"pass --allow-pickle only if you trust this file (the JSON annotations need no pickle)")
    if not path.is_file():
        raise DataError(f"{path}: legacy mask file not found")
    try:
        data = np.load(path, allow_pickle=True).item()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: cannot read legacy masks ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty dict of filename -> one-hot mask")
    masks = {}
    for name, onehot in data.items():
        onehot = np.asarray(onehot)
        if onehot.ndim != 3:
            raise DataError(f"{path}: entry {name!r} has shape {onehot.shape}, expected (H, W, n_classes)")
        masks[str(name)] = onehot.argmax(axis=-1).astype(np.uint8)
    return masks


AUGMENTATIONS = ("full", "flip", "none")  # see train_transform
CROP_SCALE = (0.4, 1.0)  # share of the image's area a scale-crop keeps
CROP_ASPECT_SPREAD = 0.85  # the crop's aspect ratio lies within the output's, times or divided by this
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}  # ColorJitter's strengths


# ------------------------------------------------------------------------------------------ augmentation on the host
# Masks follow the image's geometry by nearest neighbour; images stay uint8 and are scaled on the device.

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


# ----------------------------------------------------------------------------------------- annotations and the split

def default_data_path():
    """``$DRINKS_DATA`` when set, else ``dataset/drinks``."""
    return os.environ.get("DRINKS_DATA") or DEFAULT_DATA_PATH


class Annotations:
    """The annotated images of one annotation file: filenames, class names and native-size class maps.

    Each mask is rasterised from its regions on first use and cached, so a split only fills the polygons of
    the images it uses, once. ``masks`` may be given ready-made instead (the legacy .npy format).
    """

    def __init__(self, root, filenames, class_names, regions=None, sizes=None, masks=None):
        self.root, self.filenames, self.class_names = Path(root), list(filenames), list(class_names)
        self.regions, self.sizes = regions, sizes
        self._masks = list(masks) if masks is not None else [None] * len(self.filenames)

    def __len__(self):
        return len(self.filenames)

    def mask(self, index):
        """(H, W) uint8 class map of image ``index``."""
        if self._masks[index] is None:
            self._masks[index] = rasterise(self.regions[index], *self.sizes[index])
        return self._masks[index]

    @property
    def masks(self):
        """Every class map (rasterising those not done yet)."""
        return [self.mask(i) for i in range(len(self))]

    def subset(self, indices):
        """The annotations at ``indices``, in that order."""
        indices = list(indices)
        pick = (lambda xs: None if xs is None else [xs[i] for i in indices])
        return Annotations(self.root, pick(self.filenames), self.class_names, pick(self.regions),
                           pick(self.sizes), pick(self._masks))


def data_folder(data_path):
    """``data_path`` as a Path; DataError if it is not a folder."""
    root = Path(data_path)
    if root.is_file():
        raise DataError(f"{root}: is a file; --data-path takes the folder of the images and the JSON files")
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (set --data-path or DRINKS_DATA, "
                        f"or run: python data_generator.py --download)")
    return root


def load_annotations(data_path, split, legacy_masks=None, allow_pickle=False):
    """Read ``split`` ("train" or "test") from ``data_path`` and rasterise its masks once.

    With ``legacy_masks`` (a path to the book's .npy, needs ``allow_pickle``) masks come from that file instead.
    Only files the annotations list are touched; each mask has its own image's size.
    """
    root = data_folder(data_path)
    if legacy_masks is not None:
        by_name = read_legacy_masks(legacy_masks, allow_pickle)
        names = sorted(by_name)
        for name in names:
            image_size(root / name, f"{legacy_masks}: entry {name!r}: {root / name}")
        class_names = list(DEFAULT_CLASS_NAMES) + [str(c) for c in range(len(DEFAULT_CLASS_NAMES), _n_classes(by_name))]
        return Annotations(root, names, class_names, masks=[by_name[n] for n in names])
    json_path = root / ANNOTATION_FILES[split]
    class_names, entries = read_via(json_path)
    sizes = [image_size(root / name, f"{json_path}: entry {name!r}: {root / name}") for name, _ in entries]
    return Annotations(root, [name for name, _ in entries], class_names, [r for _, r in entries], sizes)


def _n_classes(masks):
    return max(len(DEFAULT_CLASS_NAMES), int(max(m.max() for m in masks.values())) + 1)


def split_of(train_args):
    """(validation fraction, split seed) a run held out its validation images with, from its saved flags. Runs
    from before --split-seed split by --seed."""
    return train_args.get("val_fraction", 0.1), train_args.get("split_seed", train_args.get("seed", 0))


def split_indices(n, val_fraction=0.1, seed=0):
    """Seeded (train, val) index lists of a training set of ``n`` images; val has round(n * fraction) images."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


# ------------------------------------------------------------------------------------ datasets, samplers and loaders
# The decoded image cache, the seeded per-sample augmentation keys of the training sampler (exact resume, any worker
# count), the unpadded evaluation shards, and make_dataset, which builds a split's dataset from the data folder.

class SegmentationDataset(Dataset):
    """(image uint8 (3, H, W), mask uint8 (H', W')) pairs of some annotations, through a joint transform.

    Masks are rasterised up front, and with ``cache_images`` every image is decoded once (threads), so epochs
    and forked loader workers reuse the pixels; without it each image is read from disk on use.
    An ``(index, seed)`` key runs the transform under that seed (see EpochSampler): augmentation is then the
    same whatever the number of workers, and an interrupted run can resume exactly. An ``(index, seed, size,
    flip)`` key also asks for another (height, width) (``make_transform(height, width)`` builds its transform;
    None: the dataset's own) and, when ``flip`` is not None, mirrors the pair first if it is true.
    """

    def __init__(self, annotations, transform=None, cache_images=True, workers=4, make_transform=None):
        self.annotations = annotations
        self.transform = transform
        self.make_transform = make_transform
        self._sized = {}  # (height, width) -> transform, built on first use in each process
        self.masks = annotations.masks  # (H, W) uint8 each, filled once here, before workers fork
        self.images = None
        if cache_images:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                self.images = list(pool.map(self._read, range(len(annotations))))

    def _read(self, index):
        path = self.annotations.root / self.annotations.filenames[index]
        image = read_image(path)
        mask_hw = self.masks[index].shape
        if image.shape[:2] != mask_hw:
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but its annotations are for "
                            f"{mask_hw[1]}x{mask_hw[0]}")
        return image

    def __len__(self):
        return len(self.annotations)

    def _transform_at(self, size):
        if size is None or self.make_transform is None:
            return self.transform
        if size not in self._sized:
            self._sized[size] = self.make_transform(*size)
        return self._sized[size]

    def __getitem__(self, key):
        index, seed, size, flip = (key + (None, None))[:4] if isinstance(key, tuple) else (key, None, None, None)
        image = self.images[index] if self.images is not None else self._read(index)
        image = torch.from_numpy(image).permute(2, 0, 1)  # (3, H, W) uint8
        mask = torch.from_numpy(self.masks[index])  # (H, W) uint8
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        transform = self._transform_at(size)
        if transform is not None:
            if seed is None:
                image, mask = transform(image, mask)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed reseeds every GPU too
                    image, mask = transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class EpochSampler(DistributedSampler):
    """Training sampler: a fresh shuffle each epoch from (seed, epoch), sharded over ranks, yielding
    ``(index, sample_seed)`` keys whose seed fixes that sample's augmentation.

    Call ``set_epoch`` before each epoch. ``skip`` leaves out this rank's first samples of the epoch, to resume
    mid-epoch. Without a process group it is a single replica. ``size`` (height, width), when set, asks the
    dataset for that input size this epoch (progressive resizing). ``alternate_flips``: each image is mirrored
    on alternate epochs, starting from a seeded coin toss per image, instead of at random.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0
        self.size = None
        self.alternate_flips = False

    def flips(self):
        """(N,) bool: the images mirrored this epoch under ``alternate_flips`` (None when off)."""
        if not self.alternate_flips:
            return None
        first = np.random.default_rng([self.seed, 1]).integers(0, 2, len(self.dataset)).astype(bool)
        return first ^ bool(self.epoch % 2)

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(len(self.dataset), np.uint64)
        flips = self.flips()
        size = None if self.size is None else tuple(self.size)
        return iter([(i, int(seeds[i] >> np.uint64(1)), size, None if flips is None else bool(flips[i]))
                     for i in indices])

    def __len__(self):
        return self.num_samples - self.skip


def collate_eval(batch):
    """Stack images (all at the model's size); keep native masks as a list, since their sizes may differ."""
    images, masks = zip(*batch)
    return torch.stack(images), list(masks)


class ShardSampler(Sampler):
    """Rank ``rank``'s share of the indices, ``rank::world_size``, without padding.

    DistributedSampler pads with repeated samples so every rank gets the same count; metrics summed over ranks
    would count those twice (pytorch/vision#4559). Evaluation needs no equal counts, so nothing is repeated.
    """

    def __init__(self, n, rank=0, world_size=1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loader(dataset, batch_size, train, workers=2, seed=0, rank=0, world=1, pin_memory=None):
    """DataLoader for training (EpochSampler, drop_last) or evaluation (in order, native masks as a list).

    drop_last in training because BatchNorm cannot train on a final batch of one image. With ``world`` > 1,
    rank ``rank`` gets its shard. Call ``loader.sampler.set_epoch(epoch)`` before each training epoch.
    """
    sampler = EpochSampler(dataset, world, rank, seed) if train else ShardSampler(len(dataset), rank, world)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=train, persistent_workers=workers > 0, collate_fn=None if train else collate_eval,
        prefetch_factor=4 if workers > 0 else None, multiprocessing_context=loader_context(workers),
    )


def loader_context(workers):
    """"fork" on Linux: forked workers share the decoded image cache with the parent, page by page, whereas
    spawn and forkserver (Python 3.14's default on Linux) would pickle all of it into every worker. None (the
    platform's default) elsewhere, and without workers."""
    return "fork" if workers > 0 and sys.platform.startswith("linux") else None


def make_dataset(data_path, split, height, width, augment="full", val_fraction=0.1, seed=0, limit=None,
                 cache_images=True, workers=4, legacy_masks=None, allow_pickle=False, random_flip=True):
    """The dataset of ``split``: "train" and "val" are a seeded split of the training annotations, "test" the
    test file. ``limit`` keeps the first N images of the split (smoke runs); ``random_flip=False`` leaves the
    training flips to the sampler. Returns (dataset, class_names)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if split == "test":
        ann = load_annotations(data_path, "test")
    else:
        ann = load_annotations(data_path, "train", legacy_masks, allow_pickle)
        train_idx, val_idx = split_indices(len(ann), val_fraction, seed)
        ann = ann.subset(train_idx if split == "train" else val_idx)
    if limit is not None:
        if limit > len(ann):
            raise UsageError(f"--limit {limit}: split {split!r} of {data_path} has {len(ann)} images")
        ann = ann.subset(range(limit))
    if len(ann) == 0:
        raise DataError(f"{data_path}: split {split!r} is empty (--val-fraction {val_fraction}, --limit {limit})")
    if split != "train":
        return SegmentationDataset(ann, eval_transform(height, width), cache_images, workers), ann.class_names
    make = partial(train_transform, augment=augment, random_flip=random_flip)
    return SegmentationDataset(ann, make(height, width), cache_images, workers, make), ann.class_names
