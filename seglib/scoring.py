"""Scoring a saved model (a checkpoint, or an exported .onnx file) on a split of the dataset, with the metrics
JSON, prediction PNGs and figures asked for: what evaluate.py runs, and train.py at the end of a run."""
import time
from pathlib import Path

import numpy as np

from model_utils import get_device
from seglib.annotations import build_loader, make_dataset, split_of
from seglib.checkpoints import load_weights_file
from seglib.files import DataError, output_names, write_json
from seglib.inference import evaluate_model, format_metrics_table, input_dtype, tta_cost, tta_views
from seglib.plots import save_confusion_figure, save_mask_png, save_prediction_grid
from seglib.registry import has_ema, model_from_checkpoint


def load_model(weights, device, ema=True):
    """(model in eval mode on ``device``, checkpoint) from a checkpoint path, or from a Keras HDF5 weights file
    of the book's FCN; ``ema`` False loads the trained weights of a checkpoint that also carries EMA weights.

    A ``.onnx`` file from export.py gives an OnnxModel (run by onnxruntime on the CPU) and a checkpoint-like
    dict of its metadata: the config, and the split's validation fraction and seed as ``args``.
    """
    if Path(weights).suffix.lower() == ".onnx":
        from seglib.onnx_model import OnnxModel  # onnx and onnxruntime are needed only where an exported file is read

        model = OnnxModel(weights)
        return model, {"config": model.config, "args": model.train_split}
    ckpt = load_weights_file(weights)  # a .h5 file is the book's own Keras FCN
    model = model_from_checkpoint(ckpt, weights, ema).to(device).eval()
    return model, ckpt


def evaluate_checkpoint(weights, data_path, split="test", batch_size=4, workers=2, device=None, amp=True,
                        channels_last=False, json_path=None, save_predictions=None, figures_dir=None, n_figures=6,
                        n_worst=5, seed=0, limit=None, quiet=False, compile=False, tta="none", ema=True):
    """Evaluate a checkpoint on a split; write the JSON, prediction PNGs and figures asked for.

    "train" and "val" are rebuilt with the validation fraction and split seed the checkpoint was trained with.
    ``ema`` False scores the trained weights instead of the EMA a checkpoint carries. Returns the metrics dict.
    """
    device = get_device(device)
    model, ckpt = load_model(weights, device, ema)
    cfg, train_args = ckpt["config"], ckpt.get("args", {})
    val_fraction, split_seed = split_of(train_args)
    dataset, class_names = make_dataset(data_path, split, cfg["height"], cfg["width"], augment="none",
                                        val_fraction=val_fraction, seed=split_seed, limit=limit, workers=workers)
    if list(class_names) != list(cfg["class_names"]):
        raise DataError(f"{data_path}: classes {class_names} differ from the checkpoint's {cfg['class_names']}")
    loader = build_loader(dataset, batch_size, train=False, workers=workers)
    keep = bool(save_predictions or figures_dir)
    t0 = time.perf_counter()
    metrics_acc, predictions = evaluate_model(model, loader, device, cfg["n_classes"],
                                              input_dtype(model, device, amp), channels_last,
                                              keep_predictions=keep, compile=compile, tta=tta,
                                              bar=None if quiet else f"scoring {split}")
    seconds = time.perf_counter() - t0
    metrics = {"split": split, "weights": str(weights), "tta": tta, "ema": ema and has_ema(ckpt),
               **metrics_acc.compute(class_names)}
    metrics["ms_per_image"] = round(1000 * seconds / max(1, metrics["n_images"]), 2)
    if not quiet:
        print(f"{weights} on {split} ({metrics['n_images']} images, native resolution):")
        print(format_metrics_table(metrics))
        print(f"tta {tta}: {len(tta_views(tta))} views, {tta_cost(tta):.2f} forward passes at {cfg['height']}x"
              f"{cfg['width']} per image; {metrics['ms_per_image']:.1f} ms per image on {device} (data loading, "
              f"model and native-size scoring)")
    if json_path:
        write_json(metrics, json_path)
    ann = dataset.annotations
    if save_predictions:
        for name, pred in zip(output_names(ann.filenames), predictions):  # sub1/a.jpg and sub2/a.jpg kept apart
            save_mask_png(pred, Path(save_predictions) / f"{name}.png")
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
