"""curves.py: the time-to-accuracy figure across runs and the models figure (test mIoU against GFLOPs)."""
import json
import subprocess
import sys

import pytest

import curves
from seglib.errors import DataError
from seglib.files import read_metrics

ROOT = curves.Path(curves.__file__).parent


def _write_metrics(path, seconds, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"epoch": i + 1, "seconds": s, "val": {"miou_per_image": v, "miou": v}})
                            + "\n" for i, (s, v) in enumerate(zip(seconds, scores))))


def test_time_to_accuracy_adds_up_the_epochs(tmp_path):
    _write_metrics(tmp_path / "a" / "metrics.jsonl", [60, 90, 30], [0.5, 0.7, 0.8])
    minutes, scores = curves.time_to_accuracy(read_metrics(tmp_path / "a"))
    assert minutes == pytest.approx([1.0, 2.5, 3.0]) and scores == [0.5, 0.7, 0.8]


def test_time_to_accuracy_figure_and_bad_input(tmp_path):
    for name, seconds in (("e", [70, 70]), ("s0", [60, 60, 60]), ("s1", [61, 59, 62])):
        _write_metrics(tmp_path / name / "metrics.jsonl", seconds, [0.6, 0.8, 0.9][:len(seconds)])
    out = tmp_path / "fig" / "tta.png"
    curves.main(curves.get_args_parser().parse_args([
        "--run", f"E={tmp_path / 'e'}", "--run", f"recipe={tmp_path / 's0'}", "--run",
        f"recipe={tmp_path / 's1' / 'metrics.jsonl'}", "--output", str(out)]))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.parent.glob(".*tmp*"))

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


def test_models_figure_has_one_point_per_run(tmp_path):
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
    with pytest.raises(DataError, match="unfinished: not a finished run"):
        curves.read_model_point(tmp_path / "unfinished")
