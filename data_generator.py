"""The drinks dataset: its annotated images and class maps, the seeded validation split, the datasets and loaders
that serve (image, class-map mask) pairs, and the dataset check.

Reads ``segmentation_train.json`` / ``segmentation_test.json`` (VGG Image Annotator 2 format, parsed by
seglib/via.py) from the data folder, rasterises each region into an (H, W) class map (0 background, 1 Water,
2 Soda, 3 Juice) once, and serves images through joint image/mask transforms (seglib/joint_transforms.py). The
data folder is only ever read.

Check a split, the first thing to run on new data: every image is decoded and every region filled, and every
broken file, entry or region is listed at once (then exit status 1). Then a summary of the split is printed
(image count, images with no object, pixels per class):

    python data_generator.py --data-path ../shared/datasets/drinks --split test
    python data_generator.py --split train --json
    python data_generator.py --split test --figure figures/test_annotations.png
    python data_generator.py --download            # fetch the dataset into dataset/drinks (seglib/download.py)
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from seglib.download import ANNOTATION_FILES, DEFAULT_DATA_PATH, download_drinks
from seglib.errors import DataError, UsageError, at_least, check_flags, run_cli
from seglib.files import image_size, read_image
from seglib.joint_transforms import eval_transform, train_transform
from seglib.plots import save_annotation_figure
from seglib.via import DEFAULT_CLASS_NAMES, check_entry, rasterise, read_legacy_masks, read_via


def default_data_path():
    """``$DRINKS_DATA`` when set, else ``dataset/drinks``."""
    return os.environ.get("DRINKS_DATA") or DEFAULT_DATA_PATH


# --------------------------------------------------------------------------------------------------- images


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


def split_indices(n, val_fraction=0.1, seed=0):
    """Seeded (train, val) index lists of a training set of ``n`` images; val has round(n * fraction) images."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


# --------------------------------------------------------------------------------------------------- transforms


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
                    torch.manual_seed(seed)
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


# --------------------------------------------------------------------------------------------------- check

def check_split(data_path, split, workers=8):
    """Read everything a split lists, as a user's first check of their data: every entry and region of the JSON,
    every image decoded in full (``workers`` threads), every region filled.

    Returns (Annotations of the sound entries, with their class maps; problems: one message per broken file,
    entry or region, all of them). A JSON file that cannot be read at all raises DataError.
    """
    root = data_folder(data_path)
    json_path = root / ANNOTATION_FILES[split]
    problems = []
    class_names, entries = read_via(json_path, problems)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda entry: check_entry(root, json_path, *entry), entries))
    sound = [(name, mask) for (name, _), (mask, _) in zip(entries, results) if mask is not None]
    problems += [p for _, entry_problems in results for p in entry_problems]
    return Annotations(root, [n for n, _ in sound], class_names, masks=[m for _, m in sound]), problems


# --------------------------------------------------------------------------------------------------- summary

def summarise(ann):
    """Image count, images with no object and per-class pixel counts of some annotations."""
    n_classes = len(ann.class_names)
    counts = np.zeros(n_classes, dtype=np.int64)
    empty = 0
    for mask in ann.masks:
        counts += np.bincount(mask.ravel(), minlength=n_classes)[:n_classes]
        empty += int(mask.max() == 0)
    return {"n_images": len(ann), "n_empty": empty, "class_names": list(ann.class_names),
            "pixel_counts": counts.tolist()}


def get_args_parser():
    """Flags of the dataset summary / download command."""
    parser = argparse.ArgumentParser(description="Check and summarise (or download) the drinks segmentation dataset.")
    parser.add_argument("--data-path", default=default_data_path(),
                        help="folder with the JPEGs and the VIA JSON files (default: $DRINKS_DATA or dataset/drinks)")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="annotation file to check")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads that decode the images")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument("--figure", default=None, help="save a grid of images with their masks overlaid to this PNG")
    parser.add_argument("--legacy-masks", default=None, help="read masks from the book's segmentation_train.npy")
    parser.add_argument("--allow-pickle", action="store_true", help="allow unpickling --legacy-masks (trusted files only)")
    parser.add_argument("--download", action="store_true", help="download and extract the dataset to --data-path")
    parser.add_argument("--url", action="append", default=None,
                        help="archive URL for --download; repeat it for mirrors, tried in order "
                             "(default: $DRINKS_URL, several separated by spaces, or the public copy)")
    parser.add_argument("--archive", default=None,
                        help="with --download: install this drinks.tar.gz, downloaded by hand, instead of fetching")
    return parser


def main(args):
    """Check a split (every image decoded, every region filled; all problems listed, then exit 1) and print its
    summary, or download the dataset with --download."""
    check_flags(args, [at_least("--workers", 1)])
    if args.download:
        print(f"dataset ready at {download_drinks(args.data_path, args.url, archive=args.archive)}")
        return
    if args.legacy_masks:
        ann = load_annotations(args.data_path, args.split, args.legacy_masks, args.allow_pickle)
    else:
        t0 = time.perf_counter()
        ann, problems = check_split(args.data_path, args.split, args.workers)
        json_path = Path(args.data_path) / ANNOTATION_FILES[args.split]
        if problems:
            print("\n".join(problems))
            raise DataError(f"{json_path}: {len(problems)} problems, listed above; fix them before training")
        print(f"checked {json_path}: {len(ann)} images decoded and their regions filled in "
              f"{time.perf_counter() - t0:.1f} s ({args.workers} threads), no problems",
              file=sys.stderr if args.json else sys.stdout)
    summary = summarise(ann)
    if args.json:
        print(json.dumps({"split": args.split, "n_images": summary["n_images"], "n_empty": summary["n_empty"],
                          "class_names": summary["class_names"], "pixel_counts": summary["pixel_counts"]}))
    else:
        total = sum(summary["pixel_counts"])
        print(f"{args.data_path} [{args.split}]: {summary['n_images']} images, {summary['n_empty']} with no object")
        print(f"{'class':<12}{'pixels':>14}{'share':>9}")
        for name, count in zip(summary["class_names"], summary["pixel_counts"]):
            print(f"{name:<12}{count:>14,}{count / total:>9.2%}")
    if args.figure:
        save_annotation_figure(ann, args.figure)
        print(f"saved {args.figure}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
