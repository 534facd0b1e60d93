"""README's "Train on your own images", end to end on a VIA dataset the test writes: two classes with other
names, images of mixed sizes, one image with no region. Check, train, evaluate: the class names reach the
JSON and the figures' legends."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import data_generator as dg
import evaluate
import train
from seglib import plots

CLASSES = {"1": "cat", "2": "dog"}
SIZES = [(80, 60), (64, 48), (96, 72), (72, 96)]  # (width, height): landscape and portrait


def _photo(path, size, boxes):
    """An image with a red square for each cat box and a blue disc for each dog box."""
    image = Image.new("RGB", size, (90, 110, 90))
    draw = ImageDraw.Draw(image)
    for cls, (x0, y0, x1, y1) in boxes:
        if cls == "1":
            draw.rectangle((x0, y0, x1, y1), fill=(220, 30, 30))
        else:
            draw.ellipse((x0, y0, x1, y1), fill=(30, 30, 220))
    image.save(path)


def _region(cls, box):
    x0, y0, x1, y1 = box
    if cls == "1":
        shape = {"name": "polygon", "all_points_x": [x0, x1, x1, x0], "all_points_y": [y0, y0, y1, y1]}
    else:
        shape = {"name": "ellipse", "cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2, "rx": (x1 - x0) / 2,
                 "ry": (y1 - y0) / 2, "theta": 0}
    return {"shape_attributes": shape, "region_attributes": {"kind": cls}}


def _write_split(folder, json_name, prefix, n, rng, empty=()):
    """n images of mixed sizes with one or two objects each (none for the indices in ``empty``), and the VIA
    project file that lists them, with a region attribute "kind" whose options are the class names."""
    metadata = {}
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        boxes = []
        if i not in empty:
            for cls in rng.choice(["1", "2"], size=rng.integers(1, 3)):
                x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
                boxes.append((str(cls), (x0, y0, x0 + width // 3, y0 + height // 3)))
        name = f"{prefix}{i:03d}.jpg"
        _photo(folder / name, (width, height), boxes)
        metadata[f"{name}123"] = {"filename": name, "size": 123, "file_attributes": {},
                                  "regions": [_region(cls, box) for cls, box in boxes]}
    via = {"_via_settings": {}, "_via_img_metadata": metadata,
           "_via_attributes": {"region": {"kind": {"type": "dropdown", "description": "", "options": CLASSES,
                                                   "default_options": {}}}, "file": {}}}
    (folder / json_name).write_text(json.dumps(via))


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    _write_split(folder, "segmentation_train.json", "train", 14, rng, empty={5})
    _write_split(folder, "segmentation_test.json", "test", 4, rng)
    return folder


def test_check_train_and_evaluate_carry_the_class_names(own_data, tmp_path, capsys, monkeypatch):
    # 1. the check: every image decodes, every region fills, the summary names the classes
    dg.main(dg.get_args_parser().parse_args(["--data-path", str(own_data), "--split", "train", "--json",
                                             "--workers", "2"]))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["class_names"] == ["background", "cat", "dog"]
    assert summary["n_images"] == 14 and summary["n_empty"] == 1 and min(summary["pixel_counts"]) > 0

    # 2. a tiny training run on the CPU, whose start message gives README's CPU command in full
    legends = []
    real_save_figure = plots.save_figure

    def record_legend(fig, path, *args, **kwargs):
        legends.extend(t.get_text() for legend in fig.legends for t in legend.get_texts())
        return real_save_figure(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots, "save_figure", record_legend)
    train.main(train.get_args_parser().parse_args([
        "--data-path", str(own_data), "--output-dir", str(tmp_path / "weights"), "--figures-dir",
        str(tmp_path / "figures"), "--run-name", "pets", "--workers", "0", "--height", "48", "--width", "64",
        "--epochs", "1", "--batch-size", "2", "--device", "cpu"]))
    assert train.CPU_COMMAND in capsys.readouterr().out
    run = tmp_path / "weights" / "pets"
    test_metrics = json.loads((run / "test_metrics.json").read_text())
    assert [row["name"] for row in test_metrics["per_class"]] == ["background", "cat", "dog"]
    assert test_metrics["n_images"] == 4

    # 3. evaluate.py on the checkpoint, no model flags: JSON and figure legends carry the names
    legends.clear()
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(own_data), "--json", str(tmp_path / "m.json"),
        "--figures", "2", "--figures-dir", str(tmp_path / "eval"), "--save-predictions", str(tmp_path / "preds"),
        "--workers", "0"]))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert [row["name"] for row in metrics["per_class"]] == ["background", "cat", "dog"]
    assert legends == ["background", "cat", "dog"] * 2  # samples.png and worst.png
    # predictions come back at each image's own size
    for i, (width, height) in enumerate(SIZES):
        assert Image.open(tmp_path / "preds" / f"test{i:03d}.png").size == (width, height)


def test_every_class_of_a_larger_dataset_gets_its_own_colour():
    colours = plots._colour(np.arange(12, dtype=np.uint8).reshape(3, 4)).reshape(-1, 3)
    assert len({tuple(c) for c in colours}) == 12
    assert tuple(colours[0]) == (0, 0, 0)  # background stays black
