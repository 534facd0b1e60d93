"""Annotation files to class maps: VGG Image Annotator 2 JSON (projects and exports; polygons, rectangles, circles,
ellipses) and the book's pickled one-hot masks, each region rasterised into an (H, W) uint8 class map."""
import json
import math
from pathlib import Path

import numpy as np

from seglib.errors import DataError
from seglib.files import read_image

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
