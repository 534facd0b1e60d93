"""Reading and writing files: images, JSON written through a temporary name, JSON lines (metrics.jsonl)."""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from seglib.errors import DataError


def read_image(path, where=None):
    """An RGB uint8 (H, W, 3) array; grayscale, palette and RGBA images are converted to RGB."""
    where = where or str(path)
    if not Path(path).is_file():
        raise DataError(f"{where}: image file not found")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # a writable copy
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot read image ({e})") from None


def image_size(path, where=None):
    """(height, width) from the image header, without decoding it."""
    where = where or str(path)
    if not Path(path).is_file():
        raise DataError(f"{where}: image file not found")
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read image ({e})") from None


def write_json(obj, path):
    """Write JSON through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def append_jsonl(path, record):
    """Append one JSON line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path):
    """The records of a ``metrics.jsonl`` (or of the one in a run folder), one dict per epoch."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics.jsonl there")
    try:
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON lines ({e})") from None
    if not rows or not all({"epoch", "seconds", "val"} <= set(r) for r in rows):
        raise DataError(f"{path}: no epoch records with 'epoch', 'seconds' and 'val'")
    return rows
