"""Pictures: the class palette, mask overlays, class-map PNGs, and the figures of runs and predictions (training
curves, prediction grids, confusion matrix, annotation grid). Every PNG is written through a temporary name."""
import os
from pathlib import Path

import numpy as np
from PIL import Image

from seglib.files import read_image, read_metrics

# Background black, as in the book's figures; then one clear colour per drink, then more for datasets with
# more classes (the figures' legends need one per class).
PALETTE = ((0, 0, 0), (30, 144, 255), (220, 20, 60), (255, 165, 0), (50, 205, 50), (148, 0, 211), (0, 206, 209),
           (255, 105, 180), (139, 69, 19), (255, 255, 0), (128, 128, 128), (0, 0, 139), (0, 100, 0), (255, 127, 80),
           (75, 0, 130), (189, 183, 107))


def overlay(image, mask, alpha=0.5):
    """Blend class colours over an (H, W, 3) uint8 image; background pixels are left unpainted."""
    colours = np.asarray(PALETTE, dtype=np.float32)[np.minimum(mask, len(PALETTE) - 1)]
    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.astype(np.uint8)


def save_image(image, path):
    """Write a PIL image, or an (H, W, 3) uint8 array, as a PNG through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_figure(fig, path, dpi=80):
    """Save a matplotlib figure through a temporary name, so a crash never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(plt, fig, ax, figure_path, title=None):
    """Title (if any), tight layout, then write the PNG through a temporary name and close the figure."""
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, figure_path, dpi=90)
    plt.close(fig)


def save_annotation_figure(ann, path, n=6, seed=0):
    """Save a grid of ``n`` seeded random images with their masks overlaid and a legend of class colours."""
    plt = pyplot()
    from matplotlib.patches import Patch

    picks = np.random.default_rng(seed).choice(len(ann), size=min(n, len(ann)), replace=False)
    cols = min(3, len(picks))
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), picks):
        ax.imshow(overlay(read_image(ann.root / ann.filenames[i]), ann.mask(i)))
        ax.set_title(ann.filenames[i], fontsize=9)
    handles = [Patch(color=np.array(PALETTE[c]) / 255, label=name) for c, name in enumerate(ann.class_names) if c]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def save_mask_png(pred, path):
    """Write a class map as a palette PNG: pixel values are class indices, colours make it viewable."""
    img = Image.fromarray(pred.astype(np.uint8), mode="P")
    flat = [v for rgb in PALETTE for v in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    save_image(img, path)


def _colour(mask):
    return np.asarray(PALETTE, dtype=np.uint8)[np.minimum(mask, len(PALETTE) - 1)]


def prediction_grid(ann, predictions, picks, ious, title):
    """A matplotlib Figure (drawn without pyplot, so any thread may draw it) of rows of input | ground truth |
    prediction for the images ``picks``, IoU in each row's title. ``predictions[i]`` and ``ious[i]`` are image
    ``i``'s (a list, or a dict holding the picks)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 2.5 * len(picks) + 0.7))
    axes = fig.subplots(len(picks), 3, squeeze=False)
    for row, i in zip(axes, picks):
        panels = (read_image(ann.root / ann.filenames[i]), _colour(ann.mask(i)), _colour(predictions[i]))
        for ax, panel, name in zip(row, panels, ("input", "ground truth", "prediction")):
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{ann.filenames[i]}  IoU {ious[i]:.3f}" if name == "prediction" else name, fontsize=9)
    handles = [Patch(facecolor=np.array(PALETTE[c]) / 255, edgecolor="gray", label=n)
               for c, n in enumerate(ann.class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def save_prediction_grid(ann, predictions, picks, ious, path, title):
    """``prediction_grid`` written to ``path`` as a PNG."""
    save_figure(prediction_grid(ann, predictions, picks, ious, title), path, dpi=60)


def row_normalised(confusion):
    """A confusion matrix (rows: ground truth) as shares of each row, a float64 array; an empty row stays 0."""
    conf = confusion.double().cpu().numpy()
    return conf / np.maximum(conf.sum(1, keepdims=True), 1)


def save_confusion_figure(confusion, class_names, path, title):
    """Row-normalised confusion matrix (rows: ground truth) as a PNG."""
    plt = pyplot()

    norm = row_normalised(confusion)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for r in range(len(class_names)):
        for c in range(len(class_names)):
            ax.text(c, r, f"{norm[r, c]:.3f}", ha="center", va="center", color="white" if norm[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_curves(metrics_path, figure_path):
    """Redraw training loss and validation mIoU (both definitions) per epoch from metrics.jsonl.

    Drawn on a bare matplotlib Figure, not through pyplot, so that training's background writer thread may draw
    it whatever the user's default backend.
    """
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
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
    # fixed margins: tight_layout would measure every tick label again at each epoch's redraw
    fig.subplots_adjust(left=0.085, right=0.985, bottom=0.14, top=0.96, wspace=0.24)
    save_figure(fig, figure_path)
