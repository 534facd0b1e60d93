"""curves.py: the time-to-accuracy figure across runs and the models figure (test mIoU against GFLOPs)."""
import json
import subprocess
import sys

import pytest

import curves
from seglib import plots
from seglib.files import DataError, read_metrics

ROOT = curves.Path(curves.__file__).parent


def _write_metrics(path, seconds, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"epoch": i + 1, "seconds": s, "val": {"miou_per_image": v, "miou": v}})
                            + "\n" for i, (s, v) in enumerate(zip(seconds, scores))))


def test_time_to_accuracy_adds_up_the_epochs(tmp_path):
    _write_metrics(tmp_path / "a" / "metrics.jsonl", [60, 90, 30], [0.5, 0.7, 0.8])
    minutes, scores = curves.time_to_accuracy(read_metrics(tmp_path / "a"))
    assert minutes == pytest.approx([1.0, 2.5, 3.0]) and scores == [0.5, 0.7, 0.8]


@pytest.fixture
def drawn(monkeypatch):
    """The figures as they are saved ({file name: Figure}), so a test reads what was plotted, not only the PNG."""
    figures, real = {}, plots.save_figure

    def keep(fig, path, dpi=80):
        figures[plots.Path(path).name] = fig
        real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def test_time_to_accuracy_figure_and_bad_input(tmp_path, drawn):
    for name, seconds in (("e", [70, 70]), ("s0", [60, 60, 60]), ("s1", [61, 59, 62])):
        _write_metrics(tmp_path / name / "metrics.jsonl", seconds, [0.6, 0.8, 0.9][:len(seconds)])
    out = tmp_path / "fig" / "tta.png"
    curves.main(curves.get_args_parser().parse_args([
        "--run", f"E={tmp_path / 'e'}", "--run", f"recipe={tmp_path / 's0'}", "--run",
        f"recipe={tmp_path / 's1' / 'metrics.jsonl'}", "--output", str(out)]))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.parent.glob(".*tmp*"))
    ax = drawn["tta.png"].axes[0]
    lines = ax.get_lines()
    for line, minutes in zip(lines, [[70 / 60, 140 / 60], [1.0, 2.0, 3.0], [61 / 60, 2.0, 182 / 60]], strict=True):
        assert list(line.get_xdata()) == pytest.approx(minutes)
    assert [list(line.get_ydata()) for line in lines] == [[0.6, 0.8], [0.6, 0.8, 0.9], [0.6, 0.8, 0.9]]
    assert lines[1].get_color() == lines[2].get_color() != lines[0].get_color()  # one colour a recipe
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["E", "recipe"]

    with pytest.raises(DataError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "missing")
    (tmp_path / "bad.jsonl").write_text('{not json\n{"epoch": 1, "seconds": 2, "val": {}}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 1 is not JSON"):
        read_metrics(tmp_path / "bad.jsonl")
    (tmp_path / "torn.jsonl").write_text("{not js")  # only a torn line: no complete epoch
    with pytest.raises(DataError, match="torn.jsonl: no epoch records"):
        read_metrics(tmp_path / "torn.jsonl")
    result = subprocess.run([sys.executable, str(ROOT / "curves.py"), "--run", f"x={tmp_path / 'missing'}",
                             "--output", str(tmp_path / "never.png")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "no metrics.jsonl" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "never.png").exists()
    result = subprocess.run([sys.executable, str(ROOT / "curves.py"), "--run", "no-label"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "expected LABEL=PATH" in result.stderr


def test_training_curves_plot_every_epoch(tmp_path, drawn):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": i + 1, "seconds": 1, "train_loss": loss,
                                        "val": {"miou_per_image": v, "miou": v - 0.05}}) + "\n"
                            for i, (loss, v) in enumerate([(1.2, 0.5), (0.7, 0.6), (0.4, 0.7)])))
    plots.plot_curves(path, tmp_path / "curves.png")
    loss_ax, miou_ax = drawn["curves.png"].axes
    assert [list(line.get_ydata()) for line in loss_ax.get_lines()] == [[1.2, 0.7, 0.4]]
    assert loss_ax.get_yscale() == "log"
    per_image, dataset = miou_ax.get_lines()
    assert list(per_image.get_ydata()) == [0.5, 0.6, 0.7]
    assert list(dataset.get_ydata()) == pytest.approx([0.45, 0.55, 0.65])
    assert [list(line.get_xdata()) for line in miou_ax.get_lines()] == [[1, 2, 3], [1, 2, 3]]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_figure_has_one_point_per_run(tmp_path, drawn):
    runs = []
    for name, score in (("lraspp_mobilenet_v3_large", 0.8), ("fcn_resnet56v2", 0.9)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"model": name, "height": 48, "width": 64}))
        (run / "test_metrics.json").write_text(json.dumps({"miou_per_image": score}))
        runs.append(str(run))
    old = tmp_path / "old"  # a run of the book's FCN from before the registry: its config has no model name
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"depth": 11, "n_layers": 1, "height": 48, "width": 64}))
    (old / "test_metrics.json").write_text(json.dumps({"miou_per_image": 0.5}))
    points = [curves.read_model_point(r) for r in runs]
    assert [p[0] for p in points] == ["lraspp_mobilenet_v3_large", "fcn_resnet56v2"]
    assert points[0][1] < points[1][1]  # MobileNetV3's LR-ASPP costs far fewer FLOPs than the book's FCN
    assert curves.read_model_point(old)[0] == "fcn_resnet56v2"
    out = tmp_path / "models.png"
    curves.main(curves.get_args_parser().parse_args(["--models", *runs, str(old), "--output", str(out)]))
    assert out.stat().st_size > 5000 and not list(tmp_path.glob(".*tmp*"))
    ax = drawn["models.png"].axes[0]
    drawn_points = [tuple(c.get_offsets()[0]) for c in ax.collections]
    expected = [p[1:] for p in points] + [curves.read_model_point(old)[1:]]
    assert len(drawn_points) == len(expected) == 3
    for point, want in zip(drawn_points, expected):
        assert point == pytest.approx(want)
    assert [t.get_text() for t in ax.texts] == [p[0] for p in points] + ["fcn_resnet56v2"]
    with pytest.raises(DataError, match="unfinished: not a finished run"):
        curves.read_model_point(tmp_path / "unfinished")
