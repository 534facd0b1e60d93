"""The drinks dataset's annotations: the data folder, the annotated images of a split with their class maps
(rasterised once from the VIA regions, seglib/via.py, or read from the book's legacy .npy), and the seeded
validation split of the training images."""
import os
from pathlib import Path

import numpy as np

from seglib.download import ANNOTATION_FILES, DEFAULT_DATA_PATH
from seglib.errors import DataError
from seglib.files import image_size
from seglib.via import DEFAULT_CLASS_NAMES, rasterise, read_legacy_masks, read_via


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
