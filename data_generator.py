"""The drinks dataset: its annotated images and class maps, the seeded validation split, the datasets and loaders
that serve (image, class-map mask) pairs, and the dataset check.

Reads ``segmentation_train.json`` / ``segmentation_test.json`` (VGG Image Annotator format) from the data
folder, rasterises each region into an (H, W) class map (0 background, 1 Water, 2 Soda, 3 Juice) once, and
serves images through joint image/mask transforms; all of it lives in seglib/annotations.py. The data folder is
only ever read.

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
from pathlib import Path

import numpy as np

from seglib.annotations import (
    Annotations,
    EpochSampler,
    SegmentationDataset,
    ShardSampler,
    build_loader,
    check_entry,
    collate_eval,
    data_folder,
    default_data_path,
    eval_transform,
    load_annotations,
    make_dataset,
    read_via,
    split_indices,
    train_transform,
)
from seglib.download import ANNOTATION_FILES, download_drinks
from seglib.files import DataError, at_least, check_flags, progress, run_cli
from seglib.plots import save_annotation_figure

# What the scripts and a user's own code take from here (the datasets live in seglib/annotations.py, so that the
# package never imports this script).
__all__ = ["Annotations", "EpochSampler", "SegmentationDataset", "ShardSampler", "build_loader", "check_split",
           "collate_eval", "data_folder", "default_data_path", "eval_transform", "load_annotations",
           "make_dataset", "split_indices", "summarise", "train_transform"]


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
        checked = pool.map(lambda entry: check_entry(root, json_path, *entry), entries)
        results = list(progress(checked, total=len(entries), desc=f"checking {json_path.name}", unit="img"))
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
