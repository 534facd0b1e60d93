"""seglib/scoring.py: a checkpoint scored on a split, with worst.png holding its lowest per-image IoUs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglib import scoring
from seglib.annotations import load_annotations


def test_worst_figure_shows_the_five_lowest_per_image_ious(tiny_checkpoint, drinks, tmp_path, monkeypatch):
    grids = {}

    def record(ann, predictions, picks, ious, path, title):
        grids[path.name] = (list(picks), list(ious))

    monkeypatch.setattr(scoring, "save_prediction_grid", record)
    metrics = scoring.evaluate_checkpoint(tiny_checkpoint, drinks, "test", workers=0, device="cpu",
                                          figures_dir=tmp_path, save_predictions=tmp_path / "preds", quiet=True)
    picks, ious = grids["worst.png"]
    # each image's IoU worked out again from its saved prediction and its polygons, without SegmentationMetrics
    ann = load_annotations(drinks, "test")
    expected = []
    for i, name in enumerate(ann.filenames):
        pred = np.asarray(Image.open(tmp_path / "preds" / f"{Path(name).stem}.png"))
        gt = ann.mask(i)
        present = [c for c in range(4) if (gt == c).any()]
        expected.append(np.mean([((pred == c) & (gt == c)).sum() / ((pred == c) | (gt == c)).sum() for c in present]))
    assert ious == pytest.approx(expected, abs=1e-9)
    assert len(ious) == 51 and np.mean(expected) == pytest.approx(metrics["miou_per_image"], abs=1e-9)
    assert picks == sorted(range(51), key=lambda i: ious[i])[:5]
    assert [ious[i] for i in picks] == sorted(ious)[:5]
    assert (tmp_path / "confusion_matrix.png").is_file() and len(grids["samples.png"][0]) == 6




def test_validation_split_follows_the_split_seed_not_the_seed(tiny_checkpoint, drinks, tmp_path, monkeypatch):
    """The tiny run trained with --seed 3 and the default --split-seed 0: it validated on seed 0's split, which
    evaluate.py --split val rebuilds; a checkpoint from before --split-seed was split by its --seed."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert ckpt["args"]["seed"] == 3 and ckpt["args"]["split_seed"] == 0
    seeds = []
    real = scoring.make_dataset
    monkeypatch.setattr(scoring, "make_dataset", lambda *a, **k: (seeds.append(k["seed"]), real(*a, **k))[1])
    common = dict(data_path=drinks, split="val", workers=0, device="cpu", quiet=True)
    scoring.evaluate_checkpoint(tiny_checkpoint, **common)
    del ckpt["args"]["split_seed"]
    torch.save(ckpt, tmp_path / "old.pt")
    scoring.evaluate_checkpoint(tmp_path / "old.pt", **common)
    assert seeds == [0, 3]
