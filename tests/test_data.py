"""The data pipeline: the real drinks annotations, augmentation alignment, the split and every bad input."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_generator as dg
from seglib import annotations
from seglib.files import DataError

ROOT = Path(dg.__file__).parent

# ------------------------------------------------------------------------------------------ the real dataset


@pytest.fixture(scope="module")
def train_ann(drinks):
    return dg.load_annotations(drinks, "train")


@pytest.fixture(scope="module")
def test_ann(drinks):
    return dg.load_annotations(drinks, "test")


def test_entry_counts(train_ann, test_ann):
    assert len(train_ann) == 1000 and len(test_ann) == 51
    assert "0000904.jpg" not in train_ann.filenames
    assert train_ann.class_names == ["background", "Water", "Soda", "Juice"]


def test_every_mask_is_480x640_with_classes_0_to_3(train_ann, test_ann):
    for ann in (train_ann, test_ann):
        for mask in ann.masks:
            assert mask.shape == (480, 640) and mask.dtype == np.uint8
            assert mask.max() <= 3
    assert sum(int(m.max() == 0) for m in train_ann.masks) == 3  # the README's three empty images


def _independent_fill(drinks, name):
    """An independent rasterisation: matplotlib's point-in-polygon test at every pixel centre."""
    from matplotlib.path import Path as MplPath

    via = json.loads((drinks / name).read_text())
    yy, xx = np.mgrid[0:480, 0:640]
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
    counts = np.zeros(4, dtype=np.int64)
    for item in via["_via_img_metadata"].values():
        mask = np.zeros(480 * 640, dtype=np.uint8)
        for region in item["regions"]:
            s = region["shape_attributes"]
            poly = np.stack([np.clip(s["all_points_x"], 0, 639), np.clip(s["all_points_y"], 0, 479)], axis=1)
            mask[MplPath(poly).contains_points(centres)] = int(region["region_attributes"]["Name"])
        counts += np.bincount(mask, minlength=4)
    return counts


def test_cli_json_agrees_with_an_independent_fill(drinks):
    out = subprocess.run([sys.executable, "data_generator.py", "--data-path", str(drinks), "--split", "test",
                          "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["split"] == "test" and report["n_images"] == 51
    assert report["class_names"] == ["background", "Water", "Soda", "Juice"]
    reference = _independent_fill(drinks, "segmentation_test.json")
    assert sum(report["pixel_counts"]) == 51 * 480 * 640
    for ours, ref in zip(report["pixel_counts"], reference):
        assert abs(ours - ref) / ref < 0.005


def test_validation_split_is_disjoint_and_reproducible(drinks):
    train, val = dg.split_indices(1000, 0.1, seed=0)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    assert (train, val) == dg.split_indices(1000, 0.1, seed=0)
    assert val != dg.split_indices(1000, 0.1, seed=1)[1]
    # make_dataset serves exactly those images (the training split's 900 masks are not filled here, to save time)
    val_set, _ = dg.make_dataset(drinks, "val", 60, 80, cache_images=False)
    names = dg.load_annotations(drinks, "train").filenames
    assert val_set.annotations.filenames == [names[i] for i in val]
    train_set, _ = dg.make_dataset(drinks, "train", 60, 80, limit=3, cache_images=False)
    assert train_set.annotations.filenames == [names[i] for i in train[:3]]


def test_eval_dataset_keeps_native_masks(drinks):
    ds, _ = dg.make_dataset(drinks, "test", 60, 80, limit=3)
    image, mask = ds[0]
    assert image.shape == (3, 60, 80) and image.dtype == torch.uint8
    assert mask.shape == (480, 640)


def test_seeded_keys_make_augmentation_reproducible(drinks):
    ds, _ = dg.make_dataset(drinks, "train", 60, 80, limit=4)
    a, b = ds[(1, 1234)], ds[(1, 1234)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ds[(1, 999)]
    assert not torch.equal(a[0], c[0])


def test_loader_batches_and_drops_the_last_partial_batch(drinks):
    ds, _ = dg.make_dataset(drinks, "train", 60, 80, limit=10, augment="none")
    loader = dg.build_loader(ds, 4, train=True, workers=0)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 60, 80) and batches[0][1].shape == (4, 60, 80)


def test_shard_sampler_never_repeats():
    shards = [list(dg.ShardSampler(5, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ synthetic bad input


def _image(path, size=(80, 60), mode="RGB"):
    Image.new(mode, size, 128 if mode == "L" else None).save(path)


def _via(folder, entries, name="segmentation_train.json", options=True):
    meta = {}
    for filename, regions in entries:
        meta[filename + "1"] = {"filename": filename, "size": 1, "file_attributes": {}, "regions": regions}
    via = {"_via_img_metadata": meta}
    if options:
        via["_via_attributes"] = {"region": {"Name": {"type": "dropdown", "options": {"1": "Water", "2": "Soda",
                                                                                      "3": "Juice"}}}}
    (folder / name).write_text(json.dumps(via))


def _poly(xs, ys, cls="1"):
    return {"shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
            "region_attributes": {"Name": cls}}


SQUARE = _poly([10, 30, 30, 10], [10, 10, 30, 30])


def test_missing_json(tmp_path):
    with pytest.raises(DataError, match="segmentation_train.json: annotation file not found"):
        dg.load_annotations(tmp_path, "train")


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        dg.load_annotations(tmp_path / "nowhere", "train")


def test_invalid_json(tmp_path):
    (tmp_path / "segmentation_train.json").write_text('{"a": ')
    with pytest.raises(DataError, match="segmentation_train.json: invalid JSON"):
        dg.load_annotations(tmp_path, "train")


@pytest.mark.parametrize("text, words", [("", "is empty"), ("  \n", "is empty"),
                                         ('{"_via_img_metadata": {}}', "no annotated images"),
                                         ("[]", "expected a VIA JSON object")])
def test_empty_annotation_file(tmp_path, text, words):
    (tmp_path / "segmentation_train.json").write_text(text)
    with pytest.raises(DataError, match=words):
        dg.load_annotations(tmp_path, "train")


def test_missing_image_names_file_and_entry(tmp_path):
    _via(tmp_path, [("a.jpg", [SQUARE])])
    with pytest.raises(DataError, match=r"segmentation_train.json: entry 'a.jpg': .*a.jpg: image file not found"):
        dg.load_annotations(tmp_path, "train")


def test_truncated_image(tmp_path):
    _image(tmp_path / "a.jpg", size=(320, 240))
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 3])
    _via(tmp_path, [("a.jpg", [SQUARE])])
    ann = dg.load_annotations(tmp_path, "train")  # the header is intact
    with pytest.raises(DataError, match=r"a.jpg: cannot read image"):
        dg.SegmentationDataset(ann, cache_images=True)


def test_unreadable_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not an image at all")
    _via(tmp_path, [("a.jpg", [SQUARE])])
    with pytest.raises(DataError, match=r"entry 'a.jpg': .*a.jpg: cannot read image"):
        dg.load_annotations(tmp_path, "train")


@pytest.mark.parametrize("region, words", [
    (_poly([1, 5, 9], [1, 5, 1], cls="7"), "region 0: unknown class '7'"),
    (_poly([1, 5, 9], [1, 5, 1], cls=None), "region 0: unknown class None"),
    (_poly([1, 5], [1, 5]), "region 0: polygon has 2 points, 3 to 1000"),
    (_poly(list(range(1001)), list(range(1001))), "region 0: polygon has 1001 points, 3 to 1000"),
    (_poly([[1, 2], 5, 9], [1, 5, 1]), "region 0: polygon's all_points_x must be a list of numbers"),
    (_poly([1, 5, 9], {"0": 1}), "region 0: polygon's all_points_y must be a list of numbers"),
    (_poly([1, "5", 9], [1, 5, 1]), "region 0: polygon's all_points_x must be a list of numbers"),
    (_poly([1, 5, 9], [1, 5, True]), "region 0: polygon's all_points_y must be a list of numbers"),
    ({"shape_attributes": {"name": "polygon"}, "region_attributes": {"Name": "1"}},
     "region 0: polygon's all_points_x must be a list"),
    ({"shape_attributes": {"name": "rect", "x": 1, "y": 1, "width": 5}, "region_attributes": {"Name": "1"}},
     "region 0: rect needs a number within 1,000,000 pixels of 0 for height"),
    ({"shape_attributes": {"name": "circle", "cx": [1], "cy": 1, "r": 1e999}, "region_attributes": {"Name": "1"}},
     "region 0: circle needs a number within 1,000,000 pixels of 0 for cx, r"),
    ({"shape_attributes": {"name": "circle", "cx": 1, "cy": 1, "r": 1e300}, "region_attributes": {"Name": "1"}},
     "region 0: circle needs a number within 1,000,000 pixels of 0 for r"),
    ({"shape_attributes": {"name": "ellipse", "cx": 1, "cy": 1, "rx": 2, "ry": 1, "theta": None},
      "region_attributes": {"Name": "1"}}, "region 0: ellipse needs a number within 1,000,000 pixels of 0 for theta"),
    ({"shape_attributes": [["polygon"]], "region_attributes": {"Name": "1"}}, "region 0: shape None has no area"),
    ({"shape_attributes": SQUARE["shape_attributes"], "region_attributes": ["1"]}, "region 0: unknown class None"),
    (_poly([1, 5, 9], [1, 5]), "region 0: polygon has 3 x and 2 y"),
    ({"shape_attributes": {"name": "polyline", "all_points_x": [1, 2, 3], "all_points_y": [1, 2, 3]},
      "region_attributes": {"Name": "1"}}, "region 0: shape 'polyline' has no area"),
    ({"shape_attributes": {"name": "point", "cx": 1, "cy": 1}, "region_attributes": {"Name": "1"}}, "region 0: shape 'point'"),
])
def test_bad_regions(tmp_path, region, words):
    _image(tmp_path / "a.jpg")
    _via(tmp_path, [("a.jpg", [region])])
    with pytest.raises(DataError, match=r"segmentation_train.json: entry 'a.jpg' " + words):
        dg.load_annotations(tmp_path, "train")


@pytest.mark.parametrize("edit, words", [
    (lambda doc: doc["_via_img_metadata"]["a.jpg1"].update(filename=["a.jpg"]), "entry 'a.jpg1' has no 'filename'"),
    (lambda doc: doc["_via_img_metadata"]["a.jpg1"].update(regions="polygon"), "entry 'a.jpg': regions must be a list"),
    (lambda doc: doc.update(_via_img_metadata=[1]), "_via_img_metadata must be an object of entries"),
    (lambda doc: doc["_via_attributes"]["region"]["Name"].update(options=["Water"]),
     "class options of attribute 'Name' must be an object"),
])
def test_entries_of_the_wrong_type_are_one_line(tmp_path, edit, words):
    """Every part of the file is checked where it is read, so nothing of the wrong type reaches the fill."""
    _image(tmp_path / "a.jpg")
    _via(tmp_path, [("a.jpg", [SQUARE])])
    path = tmp_path / "segmentation_train.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"segmentation_train.json: " + re.escape(words)):
        dg.load_annotations(tmp_path, "train")


def test_deeply_nested_json_is_one_line(tmp_path):
    (tmp_path / "segmentation_train.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="segmentation_train.json: invalid JSON \\(nested too deeply\\)"):
        dg.load_annotations(tmp_path, "train")


def test_the_attributes_of_a_list_type_fall_back_to_the_drinks_classes(tmp_path):
    _image(tmp_path / "a.jpg")
    _via(tmp_path, [("a.jpg", [SQUARE])])
    path = tmp_path / "segmentation_train.json"
    doc = json.loads(path.read_text())
    doc["_via_attributes"] = ["region"]
    path.write_text(json.dumps(doc))
    assert dg.load_annotations(tmp_path, "train").class_names == list(annotations.DEFAULT_CLASS_NAMES)


def test_via1_regions_keyed_by_number_are_read(tmp_path):
    _image(tmp_path / "a.jpg")
    _via(tmp_path, [("a.jpg", [SQUARE])])
    as_list = dg.load_annotations(tmp_path, "train").mask(0)
    path = tmp_path / "segmentation_train.json"
    doc = json.loads(path.read_text())
    entry = doc["_via_img_metadata"]["a.jpg1"]
    entry["regions"] = {"0": entry["regions"][0]}
    path.write_text(json.dumps(doc))
    mask = dg.load_annotations(tmp_path, "train").mask(0)
    assert mask[20, 20] == 1 and np.array_equal(mask, as_list)


def test_other_shapes_are_rasterised(tmp_path):
    _image(tmp_path / "a.jpg", size=(200, 100))
    rect = {"shape_attributes": {"name": "rect", "x": 10, "y": 20, "width": 40, "height": 30},
            "region_attributes": {"Name": "1"}}
    circle = {"shape_attributes": {"name": "circle", "cx": 120, "cy": 50, "r": 20}, "region_attributes": {"Name": "2"}}
    ellipse = {"shape_attributes": {"name": "ellipse", "cx": 170, "cy": 50, "rx": 20, "ry": 10, "theta": 0},
               "region_attributes": {"Name": "3"}}
    _via(tmp_path, [("a.jpg", [rect, circle, ellipse])])
    mask = dg.load_annotations(tmp_path, "train").mask(0)
    counts = np.bincount(mask.ravel(), minlength=4)
    assert abs(counts[1] - 40 * 30) / (40 * 30) < 0.1
    assert abs(counts[2] - np.pi * 20 ** 2) / (np.pi * 20 ** 2) < 0.05
    assert abs(counts[3] - np.pi * 20 * 10) / (np.pi * 20 * 10) < 0.1
    assert mask[35, 30] == 1 and mask[50, 120] == 2 and mask[50, 170] == 3 and mask[5, 5] == 0


def test_later_regions_overwrite_and_points_are_clipped(tmp_path):
    _image(tmp_path / "a.jpg")
    big = _poly([-1, 80, 80, -1], [-1, -1, 60, 60], cls="1")  # beyond the 80x60 image on every side
    _via(tmp_path, [("a.jpg", [big, _poly([10, 30, 30, 10], [10, 10, 30, 30], cls="3")])])
    mask = dg.load_annotations(tmp_path, "train").mask(0)
    assert mask[0, 0] == 1 and mask[59, 79] == 1 and mask[20, 20] == 3


def test_class_names_come_from_the_json_options(tmp_path):
    _image(tmp_path / "a.jpg")
    _via(tmp_path, [("a.jpg", [SQUARE])])
    assert dg.load_annotations(tmp_path, "train").class_names == ["background", "Water", "Soda", "Juice"]
    _via(tmp_path, [("a.jpg", [SQUARE])], options=False)
    assert dg.load_annotations(tmp_path, "train").class_names == list(annotations.DEFAULT_CLASS_NAMES)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    _image(tmp_path / "g.png", mode="L")
    _image(tmp_path / "r.png", mode="RGBA")
    _via(tmp_path, [("g.png", [SQUARE]), ("r.png", [SQUARE])])
    ds = dg.SegmentationDataset(dg.load_annotations(tmp_path, "train"))
    for i in range(2):
        image, mask = ds[i]
        assert image.shape == (3, 60, 80) and mask.shape == (60, 80)


def test_images_of_different_sizes_keep_their_own_mask_size(tmp_path):
    _image(tmp_path / "a.jpg", size=(80, 60))
    _image(tmp_path / "b.jpg", size=(120, 90))
    _via(tmp_path, [("a.jpg", [SQUARE]), ("b.jpg", [SQUARE])])
    ann = dg.load_annotations(tmp_path, "train")
    assert [m.shape for m in ann.masks] == [(60, 80), (90, 120)]
    ds = dg.SegmentationDataset(ann, annotations.eval_transform(32, 40))
    images, masks = next(iter(dg.build_loader(ds, 2, train=False, workers=0)))
    assert images.shape == (2, 3, 32, 40) and [m.shape for m in masks] == [(60, 80), (90, 120)]
    train_ds = dg.SegmentationDataset(ann, annotations.train_transform(32, 40))
    assert [tuple(train_ds[i][1].shape) for i in range(2)] == [(32, 40), (32, 40)]


def test_only_listed_files_are_read_and_nothing_is_written(tmp_path, drinks):
    for name in ("0000000.jpg", "0000001.jpg"):
        (tmp_path / name).write_bytes((drinks / name).read_bytes())
    (tmp_path / "._0000106.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork junk")
    (tmp_path / "0000904.jpg").write_bytes(b"broken and unlisted")
    _via(tmp_path, [("0000000.jpg", [SQUARE]), ("0000001.jpg", [])])
    tmp_path.chmod(0o555)  # read-only: any write into the data folder would fail
    try:
        before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
        ds, _ = dg.make_dataset(tmp_path, "train", 48, 64, val_fraction=0.0)
        assert len(ds) == 2 and ds[0][0].shape == (3, 48, 64)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before
    finally:
        tmp_path.chmod(0o755)


def test_legacy_npy_needs_the_explicit_flag(tmp_path):
    _image(tmp_path / "a.jpg")
    onehot = np.zeros((60, 80, 4), dtype=np.uint8)
    onehot[..., 0] = 1
    onehot[10:20, 10:20, 0], onehot[10:20, 10:20, 2] = 0, 1
    np.save(tmp_path / "segmentation_train.npy", {"a.jpg": onehot}, allow_pickle=True)
    with pytest.raises(DataError, match="segmentation_train.npy: .*pickle.*--allow-pickle"):
        dg.load_annotations(tmp_path, "train", legacy_masks=tmp_path / "segmentation_train.npy")
    ann = dg.load_annotations(tmp_path, "train", legacy_masks=tmp_path / "segmentation_train.npy", allow_pickle=True)
    assert ann.filenames == ["a.jpg"] and ann.mask(0)[15, 15] == 2 and ann.mask(0)[0, 0] == 0


def test_check_lists_every_broken_file_entry_and_region(tmp_path):
    for name in ("good.jpg", "good2.png", "bad_region.jpg", "bad_rect.jpg", "no_region.jpg"):
        _image(tmp_path / name)
    _image(tmp_path / "truncated.jpg", size=(320, 240))
    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])  # the header survives: only decoding finds it
    (tmp_path / "garbage.jpg").write_bytes(b"not an image")
    broken_rect = {"shape_attributes": {"name": "rect", "x": 1, "y": 2}, "region_attributes": {"Name": "2"}}
    _via(tmp_path, [("good.jpg", [SQUARE]), ("truncated.jpg", [SQUARE]), ("garbage.jpg", []), ("missing.jpg", []),
                    ("bad_region.jpg", [SQUARE, _poly([1, 5, 9], [1, 5, 1], cls="9")]), ("bad_rect.jpg", [broken_rect]),
                    ("good2.png", [SQUARE]), ("no_region.jpg", [])])
    via = json.loads((tmp_path / "segmentation_train.json").read_text())
    via["_via_img_metadata"]["nameless"] = {"regions": []}
    (tmp_path / "segmentation_train.json").write_text(json.dumps(via))

    ann, problems = dg.check_split(tmp_path, "train", workers=2)
    expected = ["entry 'nameless' has no 'filename'", "entry 'bad_region.jpg' region 1: unknown class '9'",
                "truncated.jpg: cannot read image", "garbage.jpg: cannot read image",
                "missing.jpg: image file not found",
                "entry 'bad_rect.jpg' region 0: rect needs a number within 1,000,000 pixels of 0 for width, height"]
    assert len(problems) == len(expected)
    for words in expected:
        assert sum(words in p for p in problems) == 1, words
    assert all(p.startswith(str(tmp_path / "segmentation_train.json")) for p in problems)
    # the sound entries are kept, with their class maps filled as load_annotations fills them
    assert ann.filenames == ["good.jpg", "bad_region.jpg", "bad_rect.jpg", "good2.png", "no_region.jpg"]
    assert ann.mask(0)[20, 20] == 1 and ann.mask(4).max() == 0

    out = subprocess.run([sys.executable, "data_generator.py", "--data-path", str(tmp_path), "--workers", "2"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert out.stdout.strip().splitlines() == problems
    assert out.stderr.strip() == (f"error: {tmp_path / 'segmentation_train.json'}: 6 problems, listed above; "
                                  f"fix them before training")


def test_check_agrees_with_load_annotations_on_the_real_test_split(drinks, test_ann):
    ann, problems = dg.check_split(drinks, "test", workers=2)
    assert problems == [] and ann.filenames == test_ann.filenames
    for i in range(len(ann)):
        np.testing.assert_array_equal(ann.mask(i), test_ann.mask(i))


def test_cli_error_is_one_line_and_non_zero(tmp_path):
    out = subprocess.run([sys.executable, "data_generator.py", "--data-path", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "nowhere: data folder not found" in out.stderr


def test_loader_workers_fork_so_the_image_cache_is_shared(drinks):
    """Spawn or forkserver (Python 3.14's default on Linux) would pickle the decoded images into every worker."""
    dataset, _ = dg.make_dataset(drinks, "test", 32, 48, augment="none", limit=4, workers=0)
    loader = dg.build_loader(dataset, 2, train=False, workers=1)
    if sys.platform.startswith("linux"):
        assert loader.multiprocessing_context.get_start_method() == "fork"
    assert sum(len(masks) for _, masks in loader) == 4
    assert dg.build_loader(dataset, 2, train=False, workers=0).multiprocessing_context is None


def test_sampler_keys_carry_the_epochs_size_and_alternating_flips(drinks):
    """``--progressive`` and ``--flips alternate`` travel in the sampler's keys: the dataset resizes to the key's
    size and mirrors the pair when its flip is set; each image's flip alternates from epoch to epoch."""
    ds, _ = dg.make_dataset(drinks, "train", 480, 640, augment="flip", limit=8, random_flip=False)
    sampler = dg.EpochSampler(ds, seed=5)
    sampler.size, sampler.alternate_flips = (32, 48), True
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append({key[0]: key for key in sampler})
    assert all(key[2] == (32, 48) for key in epochs[0].values())
    flips = [np.array([epochs[e][i][3] for i in range(8)]) for e in range(3)]
    assert 0 < flips[0].sum() < 8  # a seeded toss per image, not all the same
    assert (flips[1] == ~flips[0]).all() and (flips[2] == flips[0]).all()
    small = ds[(3, 7, (32, 48), False)]
    assert small[0].shape == (3, 32, 48) and small[1].shape == (32, 48)
    plain, mirrored = ds[(3, 7, None, False)], ds[(3, 7, None, True)]  # the dataset's own size: native here
    assert plain[0].shape == (3, 480, 640) and ds[(3, 7)][0].shape == (3, 480, 640)
    assert torch.equal(mirrored[0], plain[0].flip(-1)) and torch.equal(mirrored[1], plain[1].flip(-1))
    sampler.alternate_flips = False
    assert {key[3] for key in sampler} == {None}  # random flips are then the transform's
