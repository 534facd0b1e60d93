"""`train.py --recipe`: the preset resolves to its documented flags and explicit flags win."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(train.__file__).parent

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
        "--no-test", "--val-fraction", "0.01"])
    train.main(args)
    config = json.loads((tmp_path / "w" / "fcn-resnet56v2-4layer-drinks-cpu" / "config.json").read_text())
    assert config["recipe"] == "cpu"
    assert {k: config[k] for k in CPU_RECIPE} == {**CPU_RECIPE, "height": 48, "width": 64, "epochs": 1}


