"""`train.py --recipe`: the preset resolves to its documented flags and explicit flags win."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(train.__file__).parent

CPU_RECIPE = {"height": 96, "width": 128, "epochs": 12, "augment": "flip", "lr_schedule": "cosine",
              "warmup_epochs": 1.0, "tta": "flip", "progressive": [[64, 88, 0.5]], "loss": "ce+lovasz",
              "flips": "alternate", "zero_init_residual": True}
# the cpu recipe cut to 5 epochs, the first 3 at 64x88 (epochs 0 to 2 start before 0.6 of the run), and
# validated without TTA
CPU_FAST_RECIPE = {**CPU_RECIPE, "epochs": 5, "progressive": [[64, 88, 0.6]], "val_tta": "none"}
RECIPES = {"cpu": CPU_RECIPE, "cpu-fast": CPU_FAST_RECIPE}


def _resolved(args, keys):
    return {k: getattr(args, k) for k in keys}


@pytest.mark.parametrize("name", RECIPES)
def test_cpu_recipes_resolve_to_the_documented_flags(name):
    recipe = RECIPES[name]
    parser = train.get_args_parser()
    args = parser.parse_args(["--recipe", name])
    assert _resolved(args, recipe) == recipe
    # README spells the recipe out, and those flags alone give the same configuration
    flags = train.recipe_flags(name)
    assert f"`{flags}`" in (ROOT / "README.md").read_text()
    spelled = vars(parser.parse_args(flags.split()))
    assert {**vars(args), "recipe": None} == spelled
    # everything the recipe does not name keeps the book's default
    book = vars(parser.parse_args([]))
    assert {k: v for k, v in vars(args).items() if k not in recipe and k != "recipe"} == \
           {k: v for k, v in book.items() if k not in recipe and k != "recipe"}
    assert train.resolve_args(args).run_name == f"fcn-resnet56v2-4layer-drinks-{name}"
    assert train.resolve_args(parser.parse_args([])).run_name == "fcn-resnet56v2-4layer-drinks"


def test_the_fast_recipe_trains_three_epochs_at_64x88_then_two_at_96x128():
    from seglib.recipes import epoch_sizes
    args = train.get_args_parser().parse_args(["--recipe", "cpu-fast"])
    assert epoch_sizes(args.progressive, 0, args.epochs, (args.height, args.width)) == [(64, 88)] * 3 + [(96, 128)] * 2


@pytest.mark.parametrize("argv", [["--recipe", "cpu", "--epochs", "3", "--no-augment", "--ema", "0"],
                                  ["--epochs", "3", "--no-augment", "--ema", "0", "--recipe", "cpu"]],
                         ids=["flags-after", "flags-before"])
def test_explicit_flags_override_the_recipe(argv):
    args = train.get_args_parser().parse_args(argv + ["--run-name", "mine"])
    assert (args.epochs, args.augment, args.ema) == (3, "none", 0.0)
    assert (args.height, args.width, args.lr_schedule, args.tta) == (96, 128, "cosine", "flip")
    assert train.resolve_args(args).run_name == "mine"


def test_a_recipes_levers_can_each_be_switched_off():
    """The ablation's commands: a recipe's progressive sizes and zero-init residuals switched off by flags."""
    parser = train.get_args_parser()
    args = parser.parse_args(["--recipe", "cpu", "--progressive", "--no-zero-init-residual", "--flips", "random"])
    assert (args.progressive, args.zero_init_residual, args.flips) == ([], False, "random")
    assert (args.loss, args.height, args.epochs) == ("ce+lovasz", 96, 12)  # the rest stays the recipe's
    assert parser.parse_args(["--recipe", "cpu"]).progressive == [[64, 88, 0.5]]


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




def test_progressive_steps_give_each_epoch_its_size():
    """--progressive 64x88:0.5 over 12 epochs: epochs 1 to 6 at 64x88, 7 to 12 at the final size; with two steps
    the sizes follow in the order given."""
    from seglib.recipes import epoch_size, progressive_step
    steps = [progressive_step("64x88:0.5")]
    assert steps == [[64, 88, 0.5]]
    assert [epoch_size(steps, e, 12, (96, 128)) for e in range(12)] == [(64, 88)] * 6 + [(96, 128)] * 6
    steps = [progressive_step("32x40:0.25"), progressive_step("48X64:0.5")]
    assert [epoch_size(steps, e, 8, (96, 128)) for e in range(8)] == \
           [(32, 40)] * 2 + [(48, 64)] * 2 + [(96, 128)] * 4
    assert [epoch_size([], e, 3, (96, 128)) for e in range(3)] == [(96, 128)] * 3


def test_sizes_of_a_run_and_of_what_is_left_of_it():
    """What a run trains at, in order and once each; a run resumed past its progressive steps trains at the final
    size only, and one resumed inside a step still trains at that step's size first."""
    from seglib.recipes import progressive_step, sizes_from
    steps = [progressive_step("32x40:0.25"), progressive_step("48x64:0.5")]
    assert sizes_from(steps, 0, 8, (96, 128)) == [(32, 40), (48, 64), (96, 128)]
    assert sizes_from(steps, 3, 8, (96, 128)) == [(48, 64), (96, 128)]
    assert sizes_from(steps, 4, 8, (96, 128)) == [(96, 128)]
    assert sizes_from([], 0, 3, (96, 128)) == [(96, 128)]


def test_seconds_left_of_a_run_from_its_measured_epochs():
    """Epochs left take what their size's latest epoch took; while a size left has not been trained at, there is
    no figure (an epoch's time does not follow its pixels)."""
    from seglib.recipes import progressive_step, seconds_left
    steps = [progressive_step("64x88:0.5")]
    assert seconds_left({(64, 88): 60.0}, steps, 1, 4, (96, 128)) is None
    assert seconds_left({(64, 88): 60.0, (96, 128): 110.0}, steps, 2, 4, (96, 128)) == pytest.approx(220)
    assert seconds_left({(64, 88): 60.0, (96, 128): 110.0}, steps, 3, 4, (96, 128)) == pytest.approx(110)
    assert seconds_left({(96, 128): 95.0}, [], 1, 3, (96, 128)) == pytest.approx(190)
    assert seconds_left({(96, 128): 110.0}, [], 4, 4, (96, 128)) == 0


def test_seconds_left_scales_the_estimate_of_a_size_not_trained_at_yet():
    """Before the run reaches a size, that size's epochs count as the start-up estimate's, scaled by how the
    sizes trained at so far compare with theirs: here their epochs took 1.5 times the estimate."""
    from seglib.recipes import progressive_step, seconds_left
    steps = [progressive_step("64x88:0.5")]
    estimated = {(64, 88): 40.0, (96, 128): 80.0}
    # after epoch 1 of 4: one more at 64x88 (measured 60), two at 96x128 (80 * 60 / 40 each)
    assert seconds_left({(64, 88): 60.0}, steps, 1, 4, (96, 128), estimated) == pytest.approx(60 + 2 * 120)
    # a measured size is taken as measured, whatever the estimate
    assert seconds_left({(64, 88): 60.0, (96, 128): 100.0}, steps, 2, 4, (96, 128), estimated) == \
        pytest.approx(200)
    # a size the estimate did not time (a resumed run's estimate times only the sizes left) gives no figure
    assert seconds_left({(64, 88): 60.0}, steps, 1, 4, (96, 128), {(64, 88): 40.0}) is None
    assert seconds_left({(64, 88): 60.0}, steps, 1, 4, (96, 128), {(96, 128): 80.0}) is None
