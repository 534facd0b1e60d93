"""Evaluate a trained checkpoint (any registered model) on the drinks dataset, save predictions and figures.

Metrics are computed at the dataset's native resolution (logits are resized to the label size), in both
definitions: the book's per-image mIoU and the standard dataset-level mIoU from one confusion matrix.

    python evaluate.py --weights weights/fcn-resnet56v2-4layer-drinks/best.pt
    python evaluate.py --weights weights/RUN/best.pt --split val --json val.json --save-predictions preds/
    python evaluate.py --weights weights/RUN/best.pt --image-file photo.jpg more_photos/
    python evaluate.py --weights weights/RUN/best.pt --split train --compile   # a frozen graph for large splits
    python evaluate.py --weights model.onnx        # a file from export.py, run by onnxruntime, same outputs
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from data_generator import (DataError, PALETTE, build_loader, default_data_path, make_dataset, overlay,
                            read_image, save_figure)
from model_utils import (CheckpointError, SegmentationMetrics, amp_dtype, format_metrics_table, get_device,
                         has_ema, inference_model, keep_freed_memory, load_checkpoint, model_from_checkpoint, run_cli)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
TTA_MODES = ("none", "flip")


def to_input(images, device, channels_last=False, dtype=None):
    """uint8 (B, 3, H, W) images -> [0, 1] floats on ``device`` (the book's img_as_float scaling).

    The copy to the device moves uint8, a quarter of the bytes of float32. ``dtype`` casts the result (for a
    model whose weights were cast by ``inference_model``).
    """
    x = images.to(device, non_blocking=True).float().div_(255)
    if dtype is not None:
        x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def predict(fast, x, tta="none"):
    """float32 (B, C, H, W) logits of ``fast`` on ``x``. ``tta="flip"``: the mean of the logits of ``x`` and of
    its horizontal mirror, mirrored back (test-time augmentation; twice the compute)."""
    logits = fast(x).float()
    if tta == "flip":
        logits = (logits + fast(x.flip(-1)).float().flip(-1)) / 2
    elif tta != "none":
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    return logits


def upsample_argmax(logits, size):
    """Class map at ``size`` from (B, C, h, w) logits, resizing the logits (not the labels) bilinearly."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)  # (B, H, W)


def predictor(model, dtype=None, channels_last=False, compile=False):
    """The fast inference form of ``model`` (see model_utils.inference_model); an exported model already is one."""
    if is_exported(model):
        return model
    return inference_model(model, dtype, channels_last, compile)


def input_dtype(model, device, amp=True):
    """The dtype ``model``'s inputs are cast to: the autocast dtype, float32 (None) for an exported model."""
    return None if is_exported(model) else amp_dtype(device, amp)


def is_exported(model):
    """Whether ``model`` is an exported model (onnx_model.OnnxModel, run by onnxruntime) rather than PyTorch's."""
    return not isinstance(model, torch.nn.Module)


@torch.inference_mode()
def evaluate_model(model, loader, device, n_classes, dtype=None, channels_last=False, keep_predictions=False,
                   compile=False, tta="none"):
    """Score ``model`` (a PyTorch model, or an OnnxModel) on an evaluation loader at native label resolution
    (``compile``: through a frozen graph, see model_utils.FrozenInference; ``tta``: see ``predict``).

    Returns (SegmentationMetrics, predictions): the predictions are uint8 (H, W) class maps in loader order
    when ``keep_predictions`` is set, else None. The metrics are not reduced across ranks.
    """
    fast = predictor(model, dtype, channels_last, compile)  # BN folded, low-precision weights: a copy
    metrics = SegmentationMetrics(n_classes, device)
    predictions = [] if keep_predictions else None
    for images, masks in loader:
        logits = predict(fast, to_input(images, device, channels_last, dtype), tta)  # (B, C, h, w)
        same_size = all(m.shape == masks[0].shape for m in masks)
        preds = upsample_argmax(logits, masks[0].shape) if same_size else None
        for i, mask in enumerate(masks):
            pred = preds[i] if same_size else upsample_argmax(logits[i:i + 1], mask.shape)[0]
            metrics.update(pred, mask.to(device, non_blocking=True))
            if keep_predictions:
                predictions.append(pred.to("cpu", torch.uint8).numpy())
    return metrics, predictions


# --------------------------------------------------------------------------------------------------- outputs

def save_mask_png(pred, path):
    """Write a class map as a palette PNG: pixel values are class indices, colours make it viewable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pred.astype(np.uint8), mode="P")
    flat = [v for rgb in PALETTE for v in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_json(obj, path):
    """Write JSON through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _colour(mask):
    return np.asarray(PALETTE, dtype=np.uint8)[np.minimum(mask, len(PALETTE) - 1)]


def save_prediction_grid(ann, predictions, picks, ious, path, title):
    """Rows of input | ground truth | prediction for the images ``picks``, IoU in each row's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 2.5 * len(picks) + 0.7), squeeze=False)
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
    save_figure(fig, path, dpi=60)
    plt.close(fig)


def save_confusion_figure(confusion, class_names, path, title):
    """Row-normalised confusion matrix (rows: ground truth) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = confusion.double().cpu().numpy()
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
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


# --------------------------------------------------------------------------------------------------- entry points

def load_model(weights, device, ema=True):
    """(model in eval mode on ``device``, checkpoint) from a checkpoint path; ``ema`` False loads the trained
    weights of a checkpoint that also carries EMA weights.

    A ``.onnx`` file from export.py gives an OnnxModel (run by onnxruntime on the CPU) and a checkpoint-like
    dict of its metadata: the config, and the split's validation fraction and seed as ``args``.
    """
    if Path(weights).suffix.lower() == ".onnx":
        from onnx_model import OnnxModel  # onnx and onnxruntime are needed only where an exported file is read

        model = OnnxModel(weights)
        return model, {"config": model.config, "args": model.train_split}
    ckpt = load_checkpoint(weights)
    model = model_from_checkpoint(ckpt, weights, ema).to(device).eval()
    return model, ckpt


def evaluate_checkpoint(weights, data_path, split="test", batch_size=4, workers=2, device=None, amp=True,
                        channels_last=False, json_path=None, save_predictions=None, figures_dir=None, n_figures=6,
                        n_worst=5, seed=0, limit=None, quiet=False, compile=False, tta="none", ema=True):
    """Evaluate a checkpoint on a split; write the JSON, prediction PNGs and figures asked for.

    "train" and "val" are rebuilt with the validation fraction and seed the checkpoint was trained with.
    ``ema`` False scores the trained weights instead of the EMA a checkpoint carries. Returns the metrics dict.
    """
    device = get_device(device)
    model, ckpt = load_model(weights, device, ema)
    cfg, train_args = ckpt["config"], ckpt.get("args", {})
    dataset, class_names = make_dataset(data_path, split, cfg["height"], cfg["width"], augment="none",
                                        val_fraction=train_args.get("val_fraction", 0.1),
                                        seed=train_args.get("seed", 0), limit=limit, workers=workers)
    if list(class_names) != list(cfg["class_names"]):
        raise DataError(f"{data_path}: classes {class_names} differ from the checkpoint's {cfg['class_names']}")
    loader = build_loader(dataset, batch_size, train=False, workers=workers)
    keep = bool(save_predictions or figures_dir)
    metrics_acc, predictions = evaluate_model(model, loader, device, cfg["n_classes"],
                                              input_dtype(model, device, amp), channels_last,
                                              keep_predictions=keep, compile=compile, tta=tta)
    metrics = {"split": split, "weights": str(weights), "tta": tta, "ema": ema and has_ema(ckpt),
               **metrics_acc.compute(class_names)}
    if not quiet:
        print(f"{weights} on {split} ({metrics['n_images']} images, native resolution):")
        print(format_metrics_table(metrics))
    if json_path:
        write_json(metrics, json_path)
    ann = dataset.annotations
    if save_predictions:
        for name, pred in zip(ann.filenames, predictions):
            save_mask_png(pred, Path(save_predictions) / f"{Path(name).stem}.png")
    if figures_dir:
        ious = [float(v) for v in metrics_acc.image_ious]
        picks = np.random.default_rng(seed).choice(len(ann), size=min(n_figures, len(ann)), replace=False)
        save_prediction_grid(ann, predictions, sorted(picks.tolist()), ious, Path(figures_dir) / "samples.png",
                             f"{split}: random images (seed {seed})")
        worst = np.argsort(ious)[:min(n_worst, len(ann))].tolist()
        save_prediction_grid(ann, predictions, worst, ious, Path(figures_dir) / "worst.png",
                             f"{split}: the {len(worst)} lowest per-image IoU")
        save_confusion_figure(metrics_acc.confusion, class_names, Path(figures_dir) / "confusion_matrix.png",
                              f"{split}: row-normalised confusion, mIoU {metrics['miou']:.3f}")
    return metrics


def image_files(paths):
    """Image files named in ``paths``, expanding folders (sorted); DataError for a path that does not exist."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such image file or folder")
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no images found")
    return files


@torch.inference_mode()
def segment_files(weights, paths, out_dir, device=None, amp=True, compile=False, tta="none", ema=True):
    """Segment image files of any size: write ``<name>-mask.png`` and ``<name>-overlay.png`` to ``out_dir``."""
    from torchvision.transforms.v2 import functional as TF

    device = get_device(device)
    model, ckpt = load_model(weights, device, ema)
    cfg, dtype = ckpt["config"], input_dtype(model, device, amp)
    fast = predictor(model, dtype, True, compile)
    written = []
    for path in image_files(paths):
        image = read_image(path)  # (H, W, 3) uint8
        x = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [cfg["height"], cfg["width"]], antialias=True)
        logits = predict(fast, to_input(x[None], device, True, dtype), tta)
        pred = upsample_argmax(logits, image.shape[:2])[0].to("cpu", torch.uint8).numpy()
        stem = Path(out_dir) / path.stem
        save_mask_png(pred, f"{stem}-mask.png")
        Image.fromarray(overlay(image, pred)).save(f"{stem}-overlay.png")
        written.append(f"{stem}-mask.png")
        print(f"{path}: {stem}-mask.png, {stem}-overlay.png")
    return written


def get_args_parser():
    """Flags of evaluate.py."""
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint (any registered model) on the drinks dataset.")
    parser.add_argument("--weights", required=True,
                        help="checkpoint, e.g. weights/<run>/best.pt, or a .onnx file from export.py (onnxruntime)")
    parser.add_argument("--data-path", default=default_data_path(),
                        help="dataset folder (default: $DRINKS_DATA or dataset/drinks)")
    parser.add_argument("--split", default="test", choices=["test", "train", "val"],
                        help="split to score; train/val use the checkpoint's validation fraction and seed")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--save-predictions", default=None, help="folder for one class-index PNG per image")
    parser.add_argument("--figures", type=int, default=6,
                        help="images in samples.png (0: no figures); worst.png and confusion_matrix.png come with it")
    parser.add_argument("--figures-dir", default=None, help="folder for the figures (default: figures/<run>)")
    parser.add_argument("--image-file", nargs="+", default=None,
                        help="segment these image files or folders instead of a split")
    parser.add_argument("--output-dir", default=None,
                        help="folder for --image-file outputs (default: figures/<run>/predictions)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images of the split")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast where supported (--no-amp: float32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory format (faster convolutions on CPU and GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="run a frozen torch.compile graph: 3-9%% faster on the CPU after a compile of 5-10 s, "
                             "so worth it for large splits and folders of images")
    parser.add_argument("--tta", default="none", choices=TTA_MODES,
                        help="test-time augmentation: flip averages the logits of each image and its mirror "
                             "(twice the compute)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="score the EMA weights of a checkpoint trained with --ema (what it validated); --no-ema "
                             "scores its trained weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images in samples.png")
    return parser


def main(args):
    """Evaluate a checkpoint on a split, or segment the files given with --image-file."""
    keep_freed_memory()
    is_onnx = Path(args.weights).suffix.lower() == ".onnx"
    if args.compile and is_onnx:
        raise CheckpointError(f"{args.weights}: --compile applies to PyTorch checkpoints, not to ONNX models")
    if not args.ema and is_onnx:
        raise CheckpointError(f"{args.weights}: --no-ema applies to PyTorch checkpoints; an ONNX file holds one set "
                              f"of weights")
    run = Path(args.weights).resolve().parent.name
    if args.image_file:
        return segment_files(args.weights, args.image_file, args.output_dir or Path("figures") / run / "predictions",
                             args.device, args.amp, args.compile, args.tta, args.ema)
    figures_dir = (args.figures_dir or Path("figures") / run) if args.figures > 0 else None
    return evaluate_checkpoint(args.weights, args.data_path, args.split, args.batch_size, args.workers, args.device,
                               args.amp, args.channels_last, args.json, args.save_predictions, figures_dir,
                               args.figures, seed=args.seed, limit=args.limit, compile=args.compile, tta=args.tta,
                               ema=args.ema)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
