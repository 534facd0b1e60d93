"""Files a user gives and the files a run writes, and the errors a user can cause: images read upright and
within a photo's size, JSON and JSON lines written under a temporary name then renamed, output names kept inside
their folder, SHA-256 digests, progress bars drawn only on a terminal, and ``run_cli``, which turns a user's error
into one line on stderr and exit status 1, never a traceback."""

import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

# ------------------------------------------------------------------------------------------- errors a user can cause

class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint; the message names the file."""


class UsageError(ValueError):
    """A flag whose value is out of range or does not fit the run; the message names the flag and the value."""


class DataError(ValueError):
    """A problem with the dataset on disk; the message names the file and says what is wrong."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says why and what was kept."""


class ExportError(RuntimeError):
    """An export that cannot be written or does not match the model; the message names the file."""


class ModelError(ValueError):
    """An unknown model, or backbone weights that cannot be had or do not fit; the message says which."""


USER_ERRORS = (DataError, CheckpointError, TrainingError, ExportError, ModelError, UsageError)


def check_flags(args, rules):
    """Raise UsageError for the first flag that breaks its rule. ``rules``: (flag, test of its value, what the
    value must be), e.g. ``("--epochs", lambda v: v >= 1, "at least 1")``; a flag whose value is None (not
    given) is not tested."""
    for flag, ok, must in rules:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(ok(v) for v in values):
            raise UsageError(f"{flag} {' '.join(map(str, values))}: must be {must}")


def at_least(flag, n, why=""):
    """The check_flags rule "``flag`` must be ``n`` or more" (``why``, if given, is said after it)."""
    must = "0 or more" if n == 0 else f"at least {n}"
    return flag, (lambda v: v >= n), f"{must} ({why})" if why else must


def one_line(text):
    """The first line of an exception's text (some libraries' messages run over many lines)."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def run_cli(main, parser):
    """Run ``main(parser.parse_args())``. A user error, or a file that cannot be read or written (the OSError
    names it), becomes one line on stderr and exit status 1, never a traceback."""
    try:
        main(parser.parse_args())
    except USER_ERRORS as e:
        sys.exit(f"error: {one_line(e)}")
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or one_line(e)}")


# ------------------------------------------------------------------------------------------- images and output files

MAX_PIXELS = 60_000_000  # a photo: the largest phone and camera sensors give about 50 megapixels
EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera sets when it stores the photo turned
TURNED_SIDEWAYS = {5, 6, 7, 8}  # the orientations whose upright image swaps width and height


def read_image(path, where=None):
    """An RGB uint8 (H, W, 3) array, upright: a phone photo's EXIF orientation is applied, as every photo viewer
    and the VIA annotator show it. Grayscale, palette and RGBA images are converted to RGB."""
    where = where or str(path)
    if not Path(path).is_file():
        raise DataError(f"{where}: image file not found")
    try:
        with Image.open(path) as img:
            _check_pixels(img, where)  # from the header, before anything is decoded
            return np.array(ImageOps.exif_transpose(img).convert("RGB"))  # a writable copy
    except Image.DecompressionBombError as e:  # PIL's own refusal, at 3 times our limit
        raise DataError(f"{where}: over the {MAX_PIXELS // 10 ** 6} megapixels of the largest photos ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read image ({e})") from None


def _check_pixels(img, where):
    """DataError for an image larger than a photo: a tiny file can declare 40000x40000 pixels (gigabytes)."""
    if img.width * img.height > MAX_PIXELS:
        raise DataError(f"{where}: {img.width}x{img.height} pixels, over the {MAX_PIXELS // 10 ** 6} megapixels of "
                        f"the largest photos")


def image_size(path, where=None):
    """(height, width) of the upright image (see read_image), from the header, without decoding it."""
    where = where or str(path)
    if not Path(path).is_file():
        raise DataError(f"{where}: image file not found")
    try:
        with Image.open(path) as img:
            _check_pixels(img, where)
            sideways = img.getexif().get(EXIF_ORIENTATION, 1) in TURNED_SIDEWAYS
            return (img.width, img.height) if sideways else (img.height, img.width)
    except Image.DecompressionBombError as e:  # PIL's own refusal, at 3 times our limit
        raise DataError(f"{where}: over the {MAX_PIXELS // 10 ** 6} megapixels of the largest photos ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read image ({e})") from None


def output_names(paths):
    """A distinct file name stem for each path, safe to join to an output folder: its stem, or, where stems
    collide (``a/x.jpg`` and ``b/x.png``, ``sub1/a.jpg`` and ``sub2/a.jpg``), the parent folder, stem and suffix
    (``a-x-jpg``), numbered if that still collides. Characters other than letters, digits, ``-``, ``_`` and
    ``.`` become ``_``, and a leading dot goes, so no name is hidden, ``.`` or ``..``, or leaves the folder."""
    paths = [Path(p) for p in paths]
    stems = [_safe(p.stem) for p in paths]
    counts = Counter(stems)
    names = [_safe(f"{p.parent.name}-{p.stem}-{p.suffix.lstrip('.')}") if counts[stem] > 1 else stem
             for p, stem in zip(paths, stems)]
    totals, seen = Counter(names), Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if totals[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _safe(name):
    return re.sub(r"[^\w.-]", "_", name).lstrip(".-") or "image"


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


def read_jsonl(path):
    """(records, torn) of a JSON-lines file. A last line that is not complete JSON (a run killed while writing it)
    is left out and ``torn`` is True; a broken line before the last raises DataError."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                return rows, True
            raise DataError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return rows, False


def read_metrics(path):
    """The records of a ``metrics.jsonl`` (or of the one in a run folder), one dict per epoch. A torn last line is
    left out, saying so on stderr."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics.jsonl there")
    rows, torn = read_jsonl(path)
    if torn:
        print(f"{path}: the last line is incomplete (a run stopped while writing it); using the {len(rows)} complete "
              f"lines", file=sys.stderr)
    if not rows or not all(isinstance(r, dict) and {"epoch", "seconds", "val"} <= set(r) for r in rows):
        raise DataError(f"{path}: no epoch records with 'epoch', 'seconds' and 'val'")
    return rows


# ----------------------------------------------------------------------------------------- progress bars and digests

def progress(iterable=None, total=None, desc=None, enabled=True, **options):
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``), drawn on stderr when it is a terminal
    and ``enabled`` (False on the ranks that are not the main one)."""
    return tqdm(iterable, total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True,
                mininterval=1.0, **options)


def sha256_of(path):
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
