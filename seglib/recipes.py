"""Named recipes of train.py (``--recipe NAME`` sets the defaults of its flags) and the argparse types of its
structured flags."""
import argparse

# Named recipes: `--recipe NAME` makes these the defaults of their flags; flags given explicitly still win.
# cpu: chosen on the validation split to train, validate and test in 26 minutes on 2 cores of a Zen 4 EPYC
# (README.md); its first half of the epochs at 64x88 pays for two more epochs than the 10 of the recipe before
# it, which the same flags less the last four give (RESULTS.md, levers)
# cpu-fast: the cpu recipe cut to 5 epochs (3 at 64x88) and validated without TTA, to run in at most 45% of its
# time; it scores below it (RESULTS.md, a faster CPU recipe)
RECIPES = {
    "cpu": {"height": 96, "width": 128, "epochs": 12, "augment": "flip", "lr_schedule": "cosine",
            "warmup_epochs": 1.0, "tta": "flip", "progressive": [[64, 88, 0.5]], "loss": "ce+lovasz",
            "flips": "alternate", "zero_init_residual": True},
}
RECIPES["cpu-fast"] = {**RECIPES["cpu"], "epochs": 5, "progressive": [[64, 88, 0.6]], "val_tta": "none"}
# README's CPU recipe, which the start message of a CPU run gives in full
CPU_COMMAND = "python train.py --recipe cpu"


def recipe_flags(name):
    """The command-line flags that ``--recipe name`` stands for, e.g. ``--height 96 --width 128 ...``."""
    flags = []
    for dest, value in RECIPES[name].items():
        flag = "--" + dest.replace("_", "-")
        if value is True:  # a store_true flag
            flags.append(flag)
        elif dest == "progressive":
            flags.append(" ".join([flag] + [f"{h}x{w}:{until}" for h, w, until in value]))
        else:
            flags.append(f"{flag} {value}")
    return " ".join(flags)


class RecipeArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``--recipe NAME`` replaces the defaults of the flags in ``RECIPES[NAME]``.

    Flags given on the command line keep their values whatever their position, so ``--recipe cpu --epochs 5``
    and ``--epochs 5 --recipe cpu`` both train 5 epochs.
    """

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if getattr(parsed, "recipe", None) is None:
            return parsed, extras
        # argparse fills in a default only where the namespace lacks the attribute, so a flag whose value is
        # still the marker afterwards was not given explicitly
        unset = object()
        marked = argparse.Namespace(**{dest: unset for dest in RECIPES[parsed.recipe]})
        explicit, _ = super().parse_known_args(args, marked)
        for dest, value in RECIPES[parsed.recipe].items():
            if getattr(explicit, dest) is unset:
                setattr(parsed, dest, value)
        return parsed, extras


def ema_decay(text):
    """argparse type of --ema: 0 (off) or a decay in (0, 1)."""
    value = float(text)
    if value != 0 and not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"EMA decay must be 0 (off) or in (0, 1), got {text}")
    return value


def class_weights(text):
    """argparse type of --class-weights: "none", "auto" or comma-separated positive numbers (a list)."""
    if text in ("none", "auto"):
        return text
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if not weights or min(weights) < 0 or max(weights) == 0:
        raise argparse.ArgumentTypeError(f"expected none, auto or comma-separated non-negative numbers, got {text!r}")
    return weights


def progressive_step(text):
    """argparse type of --progressive: ``HxW:UNTIL`` -> [height, width, until] (until: a fraction of the run)."""
    try:
        size, until = text.split(":")
        height, width = (int(v) for v in size.lower().split("x"))
        until = float(until)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW:UNTIL such as 64x96:0.5, got {text!r}") from None
    if height < 32 or width < 32 or not 0 < until < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be at least 32 (the model downsamples 32 times) "
                                         f"and UNTIL between 0 and 1, both excluded")
    return [height, width, until]


def epoch_size(progressive, epoch, epochs, final):
    """(height, width) of 0-based ``epoch``: the first --progressive step whose UNTIL lies beyond the epoch's start
    (``epoch / epochs``), else ``final``."""
    for height, width, until in progressive:
        if epoch < until * epochs:
            return (height, width)
    return tuple(final)


def epoch_sizes(progressive, first_epoch, epochs, final):
    """(height, width) of each epoch from 0-based ``first_epoch`` on (see ``epoch_size``)."""
    return [epoch_size(progressive, e, epochs, final) for e in range(first_epoch, epochs)]


def sizes_from(progressive, first_epoch, epochs, final):
    """The distinct (height, width) of the epochs from 0-based ``first_epoch`` on, in training order: what a run
    (a resumed one: what is left of it) trains at."""
    return list(dict.fromkeys(epoch_sizes(progressive, first_epoch, epochs, final)))


def seconds_left(measured, progressive, done, epochs, final, estimated=None):
    """Seconds the epochs after the first ``done`` should take, from ``measured``: {(height, width): seconds of
    this run's latest epoch at that size}. A size not trained at yet counts as ``estimated[size]`` (the
    start-up estimate's seconds of an epoch at that size) times the measured sizes' seconds over their
    estimates; None while a size left has neither, since an epoch's time does not follow its pixels (JPEG
    decoding and validation cost the same at every size)."""
    known = [size for size in measured if estimated and size in estimated]
    scale = sum(measured[s] for s in known) / sum(estimated[s] for s in known) if known else None
    seconds = 0.0
    for size in epoch_sizes(progressive, done, epochs, final):
        if size in measured:
            seconds += measured[size]
        elif scale is not None and size in estimated:
            seconds += estimated[size] * scale
        else:
            return None
    return seconds
