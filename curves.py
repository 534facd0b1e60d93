"""Figures across training runs (one run's curves are seglib.plots.plot_curves, drawn by train.py every epoch):
validation mIoU against wall-clock minutes for several runs (time to accuracy), and test mIoU against inference
cost for runs of different models.

    python curves.py --run "E=weights/cpu-e" --run "recipe cpu=weights/cpu-recipe-seed0" \\
        --run "recipe cpu=weights/cpu-recipe-seed1" --output figures/results/time_to_accuracy.png
    python curves.py --models weights/cmp-* --output figures/results/models.png

Runs given with the same label share a colour (seeds of one recipe). The time axis adds up each epoch's
``seconds`` (training and validation); the start-up before the first epoch and the final test evaluation are
not in it.
"""
import argparse
import itertools
import json
from pathlib import Path

from seglib.files import DataError, read_metrics, run_cli
from seglib.plots import finish_figure, pyplot
from seglib.profiling import model_gflops
from seglib.registry import checkpoint_model


def time_to_accuracy(rows, key="miou_per_image"):
    """(minutes, scores): the wall-clock minutes at the end of each epoch and its validation ``key``."""
    minutes = [total / 60 for total in itertools.accumulate(r["seconds"] for r in rows)]
    return minutes, [r["val"][key] for r in rows]


def plot_time_to_accuracy(runs, figure_path, title=None):
    """Validation mIoU per image against wall-clock minutes; ``runs`` is a list of (label, metrics path)."""
    plt = pyplot()
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
    finish_figure(plt, fig, ax, figure_path, title)


def read_model_point(run_dir):
    """(model name, GFLOPs per image at the training size, test mIoU per image) of a finished run folder, from
    its ``config.json`` and ``test_metrics.json``."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        test = json.loads((run_dir / "test_metrics.json").read_text())
        name = checkpoint_model(config)[0]
        size = config["height"], config["width"]
        score = test["miou_per_image"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise DataError(f"{run_dir}: not a finished run with config.json and test_metrics.json ({e})") from None
    return name, model_gflops(name, *size)[0], score


def plot_models(run_dirs, figure_path, title=None):
    """Test mIoU per image against forward GFLOPs per image (log scale), one labelled point per run."""
    plt = pyplot()
    points = [read_model_point(d) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, gflops, score) in enumerate(points):
        ax.scatter([gflops], [score], color=f"C{i}", s=30, zorder=3)
        ax.annotate(name, (gflops, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per image (forward, at the training size)")
    ax.set_ylabel("test mIoU per image (book)")
    ax.margins(x=0.25, y=0.15)
    ax.grid(alpha=0.3, which="both")
    finish_figure(plt, fig, ax, figure_path, title)


def labelled_run(text):
    """argparse type of --run: ``LABEL=PATH``."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def get_args_parser():
    """Flags of the time-to-accuracy and models figures."""
    p = argparse.ArgumentParser(description="Plot validation mIoU against wall-clock time for training runs, or "
                                            "test mIoU against GFLOPs for runs of different models.")
    figure = p.add_mutually_exclusive_group(required=True)
    figure.add_argument("--run", dest="runs", type=labelled_run, action="append", metavar="LABEL=PATH",
                        help="time to accuracy: a run folder (or its metrics.jsonl) and its legend label; repeat for "
                             "more runs, reusing a label for the seeds of one recipe")
    figure.add_argument("--models", nargs="+", metavar="RUN", default=None,
                        help="models figure: finished run folders (config.json, test_metrics.json), one point each")
    p.add_argument("--output", default=None,
                   help="the PNG to write (default: figures/results/time_to_accuracy.png, or models.png)")
    p.add_argument("--title", default=None, help="a title above the plot (e.g. the machine)")
    return p


def main(args):
    """Write the time-to-accuracy figure of ``args.runs``, or the models figure of ``args.models``."""
    output = args.output or f"figures/results/{'models' if args.models else 'time_to_accuracy'}.png"
    if args.models:
        plot_models(args.models, output, args.title)
    else:
        plot_time_to_accuracy(args.runs, output, args.title)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
