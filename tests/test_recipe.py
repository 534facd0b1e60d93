"""`train.py --recipe`: the preset resolves to its documented flags and explicit flags win; the time-to-accuracy
figure of curves.py."""
import json
import subprocess
import sys

import pytest

import curves
import train
from data_generator import DataError

ROOT = curves.Path(curves.__file__).parent

CPU_RECIPE = {"height": 96, "width": 128, "epochs": 10, "augment": "flip", "lr_schedule": "cosine",
              "warmup_epochs": 1.0, "tta": "flip"}


def _resolved(args, keys):
    return {k: getattr(args, k) for k in keys}


def test_cpu_recipe_resolves_to_the_documented_flags():
    parser = train.get_args_parser()
    args = parser.parse_args(["--recipe", "cpu"])
    assert _resolved(args, CPU_RECIPE) == CPU_RECIPE
    # README spells the recipe out, and those flags alone give the same configuration
    flags = train.recipe_flags("cpu")
    assert f"`{flags}`" in (ROOT / "README.md").read_text()
    spelled = vars(parser.parse_args(flags.split()))
    assert {**vars(args), "recipe": None} == spelled
    # everything the recipe does not name keeps the book's default
    book = vars(parser.parse_args([]))
    assert {k: v for k, v in vars(args).items() if k not in CPU_RECIPE and k != "recipe"} == \
           {k: v for k, v in book.items() if k not in CPU_RECIPE and k != "recipe"}
    assert train.resolve_args(args).run_name == "fcn-resnet56v2-4layer-drinks-cpu"
    assert train.resolve_args(parser.parse_args([])).run_name == "fcn-resnet56v2-4layer-drinks"


@pytest.mark.parametrize("argv", [["--recipe", "cpu", "--epochs", "3", "--no-augment", "--ema", "0"],
                                  ["--epochs", "3", "--no-augment", "--ema", "0", "--recipe", "cpu"]],
                         ids=["flags-after", "flags-before"])
def test_explicit_flags_override_the_recipe(argv):
    args = train.get_args_parser().parse_args(argv + ["--run-name", "mine"])
    assert (args.epochs, args.augment, args.ema) == (3, "none", 0.0)
    assert (args.height, args.width, args.lr_schedule, args.tta) == (96, 128, "cosine", "flip")
    assert train.resolve_args(args).run_name == "mine"


def test_unknown_recipe_is_refused():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--recipe", "gpu"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "invalid choice: 'gpu'" in result.stderr


def test_recipe_run_saves_its_resolved_flags(tmp_path, drinks):
    """config.json holds what the recipe resolved to, with the explicit overrides, not the parser defaults."""
    args = train.get_args_parser().parse_args([
        "--recipe", "cpu", "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"), "--figures-dir",
        str(tmp_path / "f"), "--workers", "0", "--height", "48", "--width", "64", "--epochs", "1", "--limit", "8",
        "--no-test"])
    train.main(args)
    config = json.loads((tmp_path / "w" / "fcn-resnet56v2-4layer-drinks-cpu" / "config.json").read_text())
    assert config["recipe"] == "cpu"
    assert {k: config[k] for k in CPU_RECIPE} == {**CPU_RECIPE, "height": 48, "width": 64, "epochs": 1}


def _write_metrics(path, seconds, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"epoch": i + 1, "seconds": s, "val": {"miou_per_image": v, "miou": v}})
                            + "\n" for i, (s, v) in enumerate(zip(seconds, scores))))


def test_time_to_accuracy_adds_up_the_epochs(tmp_path):
    _write_metrics(tmp_path / "a" / "metrics.jsonl", [60, 90, 30], [0.5, 0.7, 0.8])
    minutes, scores = curves.time_to_accuracy(curves.read_metrics(tmp_path / "a"))
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
        curves.read_metrics(tmp_path / "missing")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: not JSON lines"):
        curves.read_metrics(tmp_path / "bad.jsonl")
    result = subprocess.run([sys.executable, str(ROOT / "curves.py"), "--run", f"x={tmp_path / 'missing'}",
                             "--output", str(tmp_path / "never.png")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "no metrics.jsonl" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "never.png").exists()
    result = subprocess.run([sys.executable, str(ROOT / "curves.py"), "--run", "no-label"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "expected LABEL=PATH" in result.stderr
