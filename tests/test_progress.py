"""Progress bars: the data check, evaluate.py's scoring and image segmentation, and export.py's check draw a tqdm
bar on a terminal and write nothing when stderr is a pipe or a file (logs, CI)."""
import io
import sys

import torch

import data_generator as dg
import evaluate
import export
from seglib import scoring
from seglib.checkpoints import load_checkpoint
from seglib.registry import model_from_checkpoint


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _stderr_of(monkeypatch, stream, fn):
    monkeypatch.setattr(sys, "stderr", stream)
    fn()
    monkeypatch.undo()
    return stream.getvalue()


def test_data_check_bar_only_on_a_terminal(drinks, monkeypatch):
    check = lambda: dg.check_split(drinks, "test", workers=2)  # noqa: E731
    shown = _stderr_of(monkeypatch, Terminal(), check)
    assert "checking segmentation_test.json" in shown and "51/51" in shown
    assert _stderr_of(monkeypatch, io.StringIO(), check) == ""


def test_scoring_segmenting_and_export_check_bars(tiny_checkpoint, drinks, monkeypatch, tmp_path):
    score = lambda: scoring.evaluate_checkpoint(tiny_checkpoint, drinks, "test", workers=0, device="cpu",  # noqa: E731
                                                limit=4)
    assert "scoring test" in _stderr_of(monkeypatch, Terminal(), score)
    assert _stderr_of(monkeypatch, io.StringIO(), score) == ""
    photos = sorted(drinks.glob("*.jpg"))[:2]
    segment = lambda: evaluate.segment_files(tiny_checkpoint, photos, tmp_path / "out", device="cpu")  # noqa: E731
    assert "segmenting" in _stderr_of(monkeypatch, Terminal(), segment)
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    images = torch.rand(2, 3, 32, 40)
    compare = lambda: export.compare(model, model, images)  # noqa: E731
    shown = _stderr_of(monkeypatch, Terminal(), compare)
    assert "checking the export" in shown and "2/2" in shown
    assert _stderr_of(monkeypatch, io.StringIO(), compare) == ""
