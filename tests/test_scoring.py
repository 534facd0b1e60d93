"""seglib/scoring.py: a checkpoint scored on a split, with worst.png holding its lowest per-image IoUs."""
import numpy as np
import pytest

from seglib import scoring


def test_worst_figure_shows_the_five_lowest_per_image_ious(tiny_checkpoint, drinks, tmp_path, monkeypatch):
    grids = {}

    def record(ann, predictions, picks, ious, path, title):
        grids[path.name] = (list(picks), list(ious))

    monkeypatch.setattr(scoring, "save_prediction_grid", record)
    metrics = scoring.evaluate_checkpoint(tiny_checkpoint, drinks, "test", workers=0, device="cpu",
                                          figures_dir=tmp_path, quiet=True)
    picks, ious = grids["worst.png"]
    assert len(ious) == 51 and np.mean(ious) == pytest.approx(metrics["miou_per_image"], abs=1e-9)
    assert picks == sorted(range(51), key=lambda i: ious[i])[:5]
    assert [ious[i] for i in picks] == sorted(ious)[:5]
    assert (tmp_path / "confusion_matrix.png").is_file() and len(grids["samples.png"][0]) == 6


