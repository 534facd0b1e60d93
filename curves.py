"""Figures of training runs from their ``metrics.jsonl``: one run's curves (train.py draws them every epoch), and
validation mIoU against wall-clock minutes for several runs (time to accuracy).

    python curves.py --run "E=weights/cpu-e" --run "recipe cpu=weights/cpu-recipe-seed0" \\
        --run "recipe cpu=weights/cpu-recipe-seed1" --output figures/results/time_to_accuracy.png

Runs given with the same label share a colour (seeds of one recipe). The time axis adds up each epoch's
``seconds`` (training and validation); the start-up before the first epoch and the final test evaluation are
not in it.
"""
import argparse
import itertools
import json
from pathlib import Path

from data_generator import DataError, save_figure
from model_utils import run_cli


def read_metrics(path):
    """The records of a ``metrics.jsonl`` (or of the one in a run folder), one dict per epoch."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics.jsonl there")
    try:
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON lines ({e})") from None
    if not rows or not all({"epoch", "seconds", "val"} <= set(r) for r in rows):
        raise DataError(f"{path}: no epoch records with 'epoch', 'seconds' and 'val'")
    return rows


def time_to_accuracy(rows, key="miou_per_image"):
    """(minutes, scores): the wall-clock minutes at the end of each epoch and its validation ``key``."""
    minutes = [total / 60 for total in itertools.accumulate(r["seconds"] for r in rows)]
    return minutes, [r["val"][key] for r in rows]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_path, figure_path):
    """Redraw training loss and validation mIoU (both definitions) per epoch from metrics.jsonl."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker="o", ms=3)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [r["val"]["miou_per_image"] for r in rows], marker="o", ms=3, label="mIoU per image (book)")
    ax2.plot(epochs, [r["val"]["miou"] for r in rows], marker="s", ms=3, label="mIoU (dataset)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation mIoU")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, figure_path)
    plt.close(fig)


def plot_time_to_accuracy(runs, figure_path, title=None):
    """Validation mIoU per image against wall-clock minutes; ``runs`` is a list of (label, metrics path)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {}
    for label, path in runs:
        minutes, scores = time_to_accuracy(read_metrics(path))
        first = label not in colours
        colours.setdefault(label, f"C{len(colours)}")
        ax.plot(minutes, scores, marker="o", ms=3, color=colours[label], label=label if first else None, alpha=0.85)
    ax.set_xlabel("wall-clock minutes (training + validation)")
    ax.set_ylabel("validation mIoU per image")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, figure_path, dpi=90)
    plt.close(fig)


def labelled_run(text):
    """argparse type of --run: ``LABEL=PATH``."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def get_args_parser():
    """Flags of the time-to-accuracy figure."""
    p = argparse.ArgumentParser(description="Plot validation mIoU against wall-clock time for training runs.")
    p.add_argument("--run", dest="runs", type=labelled_run, action="append", required=True, metavar="LABEL=PATH",
                   help="a run folder (or its metrics.jsonl) and its legend label; repeat for more runs, reusing a "
                        "label for the seeds of one recipe")
    p.add_argument("--output", default="figures/results/time_to_accuracy.png", help="the PNG to write")
    p.add_argument("--title", default=None, help="a title above the plot (e.g. the machine)")
    return p


def main(args):
    """Write the time-to-accuracy figure of ``args.runs``."""
    plot_time_to_accuracy(args.runs, args.output, args.title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
