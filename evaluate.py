"""Evaluate a trained checkpoint (any registered model) on the drinks dataset, save predictions and figures.

Metrics are computed at the dataset's native resolution (logits are resized to the label size), in both
definitions: the book's per-image mIoU and the standard dataset-level mIoU from one confusion matrix.

    python evaluate.py --weights weights/fcn-resnet56v2-4layer-drinks/best.pt
    python evaluate.py --weights weights/RUN/best.pt --split val --json val.json --save-predictions preds/
    python evaluate.py --weights weights/RUN/best.pt --image-file photo.jpg more_photos/
    python evaluate.py --weights weights/RUN/best.pt --split train --compile   # a frozen graph for large splits
    python evaluate.py --weights model.onnx        # a file from export.py, run by onnxruntime, same outputs
    python evaluate.py --weights ResNet56v2-3layer-drinks-best-iou.h5   # the book's own trained Keras FCN
"""
import argparse
import sys
from pathlib import Path

import torch

from data_generator import default_data_path
from model_utils import get_device, keep_freed_memory
from seglib.files import CheckpointError, DataError, at_least, check_flags, output_names, progress, read_image, run_cli
from seglib.inference import TTA_MODES, input_dtype, predict, predictor, to_input, upsample_argmax
from seglib.plots import overlay, save_image, save_mask_png
from seglib.scoring import evaluate_checkpoint, load_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def image_files(paths):
    """(image files, names skipped) of ``paths``: folders are expanded (sorted) to their image files, and their other
    files are skipped; a file named directly is always tried. DataError for a path that does not exist."""
    files, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            entries = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            files += [f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES]
            skipped += [f for f in entries if f.suffix.lower() not in IMAGE_SUFFIXES]
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such image file or folder")
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no images found")
    return files, skipped


@torch.inference_mode()
def segment_files(weights, paths, out_dir, device=None, amp=True, compile=False, tta="none", ema=True):
    """Segment image files of any size: write ``<name>-mask.png`` and ``<name>-overlay.png`` to ``out_dir`` for
    every file that reads, list every one that does not with its reason, and say how many of how many were
    written; DataError at the end if any failed. Returns the masks written."""
    from torchvision.transforms.v2 import functional as TF

    device = get_device(device)
    model, ckpt = load_model(weights, device, ema)
    cfg, dtype = ckpt["config"], input_dtype(model, device, amp)
    fast = predictor(model, dtype, True, compile)
    files, skipped = image_files(paths)
    written, failed = [], []
    for path, name in progress(list(zip(files, output_names(files))), desc="segmenting", unit="img"):
        try:
            image = read_image(path)  # (H, W, 3) uint8
        except DataError as e:
            failed.append(str(e))
            print(f"{path}: skipped, {e}", file=sys.stderr)
            continue
        x = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [cfg["height"], cfg["width"]], antialias=True)
        logits = predict(fast, to_input(x[None], device, True, dtype), tta)
        pred = upsample_argmax(logits, image.shape[:2])[0].to("cpu", torch.uint8).numpy()
        mask, over = Path(out_dir) / f"{name}-mask.png", Path(out_dir) / f"{name}-overlay.png"  # inside out_dir
        save_mask_png(pred, mask)
        save_image(overlay(image, pred), over)
        written.append(str(mask))
        print(f"{path}: {mask}, {over}")
    other = f"; {len(skipped)} files that are not images skipped" if skipped else ""
    print(f"wrote masks and overlays of {len(written)} of {len(files)} images to {out_dir}{other}")
    if failed:
        raise DataError(f"{len(failed)} of {len(files)} images could not be read (listed above); the other "
                        f"{len(written)} were written to {out_dir}")
    return written


def get_args_parser():
    """Flags of evaluate.py."""
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint (any registered model) on the drinks dataset.")
    g = parser.add_argument_group("what to score")
    g.add_argument("--weights", required=True,
                   help="checkpoint, e.g. weights/<run>/best.pt, a .onnx file from export.py (onnxruntime), or "
                        "the book's Keras weights file (.h5), scored at 480x640")
    g.add_argument("--data-path", default=default_data_path(),
                   help="dataset folder (default: $DRINKS_DATA or dataset/drinks)")
    g.add_argument("--split", default="test", choices=["test", "train", "val"],
                   help="split to score; train/val use the checkpoint's validation fraction and seed")
    g.add_argument("--image-file", nargs="+", default=None,
                   help="segment these image files or folders instead of a split")
    g.add_argument("--limit", type=int, default=None, help="score only the first N images of the split")
    g = parser.add_argument_group("model")
    g.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation: flip averages the logits of each image and its mirror "
                        "(twice the compute)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="score the EMA weights of a checkpoint trained with --ema (what it validated); --no-ema "
                        "scores its trained weights")
    g = parser.add_argument_group("outputs")
    g.add_argument("--json", default=None, help="write the metrics to this JSON file")
    g.add_argument("--save-predictions", default=None, help="folder for one class-index PNG per image")
    g.add_argument("--figures", type=int, default=6,
                   help="images in samples.png (0: no figures); worst.png and confusion_matrix.png come with it")
    g.add_argument("--figures-dir", default=None, help="folder for the figures (default: figures/<run>)")
    g.add_argument("--output-dir", default=None,
                   help="folder for --image-file outputs (default: figures/<run>/predictions)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random images in samples.png")
    g = parser.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast where supported (--no-amp: float32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (faster convolutions on CPU and GPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="run a frozen torch.compile graph: 3-9%% faster on the CPU after a compile of 5-10 s, "
                        "so worth it for large splits and folders of images")
    return parser


def main(args):
    """Evaluate a checkpoint on a split, or segment the files given with --image-file."""
    check_flags(args, [at_least("--batch-size", 1), at_least("--workers", 0), at_least("--figures", 0),
                       at_least("--limit", 1)])
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
