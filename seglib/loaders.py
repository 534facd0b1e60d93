"""The datasets and loaders that serve (image, class-map mask) pairs of a split: the decoded image cache, the
seeded per-sample augmentation keys of the training sampler (exact resume, any worker count), the unpadded
evaluation shards, and ``make_dataset``, which builds a split's dataset from the data folder."""
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from seglib.annotations import load_annotations, split_indices
from seglib.errors import DataError, UsageError
from seglib.files import read_image
from seglib.joint_transforms import eval_transform, train_transform


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
