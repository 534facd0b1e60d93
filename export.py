"""Export a trained checkpoint to ONNX, or as released weights, and check the file against PyTorch on real test
images.

The file holds the inference form of the model (eval mode, BatchNorm folded, float32) with dynamic batch,
height and width; input ``images`` (B, 3, H, W) float32 in [0, 1], outputs ``logits`` and ``labels`` (the
argmax class map); the class names and training input size are in its metadata (see seglib/onnx_model.py).
After export, onnxruntime runs it on a few test images at the training size (seeded random images where the
dataset is not on this machine) and its logits are compared with the PyTorch float32 model's; below
``--min-agreement`` of pixels with the same argmax, nothing is written.

``--format weights`` writes the model's weights alone (the EMA where the run kept one; no optimizer state:
about a third of the checkpoint) with the config, class names and training flags, named
``<name>-<first 8 hex digits of its SHA-256>.pt`` for ``torch.hub.load_state_dict_from_url(check_hash=True)``;
hubconf.py loads it and evaluate.py scores it like a checkpoint (weights/MODEL_CARD.md: what a release states).

    python export.py --weights weights/fcn-resnet56v2-4layer-drinks/best.pt --output model.onnx
    python evaluate.py --weights model.onnx                       # score it with the same metrics
    python export.py --weights weights/fcn-resnet56v2-4layer-drinks/best.pt --format weights
    python export.py --weights ResNet56v2-3layer-drinks-best-iou.h5 --format weights   # the book's own model
"""
import argparse
import contextlib
import os
from pathlib import Path

import torch

from data_generator import build_loader, default_data_path, make_dataset
from seglib.annotations import split_of
from seglib.checkpoints import is_keras_file, load_checkpoint, load_weights_file, release_state, write_release
from seglib.files import DataError, ExportError, at_least, check_flags, progress, run_cli
from seglib.inference import to_input
from seglib.onnx_model import OPSET, OnnxModel, export_onnx
from seglib.registry import model_from_checkpoint


@torch.inference_mode()
def compare(model, onnx_model, images):
    """(largest absolute logit difference, share of pixels with the same argmax) of onnxruntime against the
    PyTorch ``model`` in float32 on ``images``, a float32 (B, 3, H, W) batch."""
    largest, same = 0.0, 0.0
    for image in progress(images.split(1), desc="checking the export", unit="img"):  # (1, 3, H, W) each
        reference, exported = model(image), onnx_model(image)  # (1, C, H, W)
        largest = max(largest, (reference - exported).abs().max().item())
        same += (reference.argmax(1) == exported.argmax(1)).double().mean().item()
    return largest, same / len(images)


def check_images(data_path, config, n, workers=0):
    """(a float32 (n, 3, H, W) batch at the model's input size, what it is): the first ``n`` test images, or,
    where the dataset is not on this machine (export needs none), ``n`` seeded random images."""
    try:
        dataset, _ = make_dataset(data_path, "test", config["height"], config["width"], augment="none",
                                  workers=workers)
    except DataError as e:
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(n, 3, config["height"], config["width"], generator=generator)
        return images, f"{n} seeded random images (no test images: {e})"
    images, _ = next(iter(build_loader(dataset, n, train=False, workers=0, pin_memory=False)))  # the first n
    return to_input(images, torch.device("cpu")), f"{images.shape[0]} test images"


def remove_quietly(path):
    """Delete ``path`` if it is there (a temporary file; a path that cannot exist is no error)."""
    with contextlib.suppress(OSError):
        path.unlink()


def write_onnx(model, ckpt, weights, output, opset=OPSET):
    """Export to a temporary name beside ``output`` (which is left untouched on failure); returns that name."""
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    train_args = ckpt.get("args", {})
    val_fraction, seed = split_of(train_args)
    split = {"val_fraction": val_fraction, "seed": seed}  # the seed of the split (--split-seed)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, ckpt["config"], tmp, split, source=Path(weights).name, opset=opset)
    except OSError as e:
        remove_quietly(tmp)
        raise ExportError(f"{output}: cannot write the ONNX file ({e.strerror or e})") from None
    return tmp


def get_args_parser():
    """Flags of export.py."""
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX and check it against PyTorch.")
    g = p.add_argument_group("what to export")
    g.add_argument("--weights", required=True, help="checkpoint to export, e.g. weights/<run>/best.pt")
    g.add_argument("--format", default="onnx", choices=["onnx", "weights"],
                   help="onnx: an ONNX graph for onnxruntime; weights: the model's weights alone, named with their "
                        "hash, for torch.hub and evaluate.py")
    g.add_argument("--output", default=None,
                   help="file to write (default: the checkpoint's name with .onnx; with --format weights, the run "
                        "folder's name in the checkpoint's folder, with -<hash>.pt appended to the stem)")
    g.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version")
    g = p.add_argument_group("the check against PyTorch")
    g.add_argument("--data-path", default=default_data_path(),
                   help="dataset whose test images check the export (default: $DRINKS_DATA or dataset/drinks)")
    g.add_argument("--check-images", type=int, default=4,
                   help="test images to compare onnxruntime with PyTorch on, seeded random images where the dataset "
                        "is not found (0: no check)")
    g.add_argument("--min-agreement", type=float, default=0.999,
                   help="least share of pixels whose argmax must agree with PyTorch float32")
    return p


def export_weights(args, ckpt):
    """Write the release file (hashed name), read it back and check it gives the checkpoint's logits exactly."""
    # a run's checkpoint is named by its run folder, the book's Keras file by its own name
    default = Path(args.weights).stem if is_keras_file(args.weights) else Path(args.weights).resolve().parent.name
    target = Path(args.output or default)
    folder = target.parent if args.output else Path(args.weights).parent
    path = write_release(release_state(ckpt, args.weights), folder, target.name.removesuffix(".pt"))
    result = {"output": str(path), "bytes": path.stat().st_size}
    if args.check_images > 0:
        images, source = check_images(args.data_path, ckpt["config"], args.check_images)
        with torch.inference_mode():
            same = torch.equal(model_from_checkpoint(ckpt, args.weights).eval()(images),
                               model_from_checkpoint(load_checkpoint(path), path).eval()(images))
        if not same:
            path.unlink()
            raise ExportError(f"{path}: read back, it does not give the checkpoint's logits; removed")
        result["checked_on"] = source
        print(f"read back {path}: the same logits as {args.weights} on {source}")
    print(f"wrote {path} ({result['bytes'] / 2 ** 20:.1f} MiB; the checkpoint: "
          f"{Path(args.weights).stat().st_size / 2 ** 20:.1f} MiB)")
    return result


def main(args):
    """Export, check against PyTorch, then move the file into place. Returns the check's numbers."""
    check_flags(args, [at_least("--check-images", 0), ("--min-agreement", lambda v: 0 <= v <= 1, "between 0 and 1")])
    if Path(args.weights).suffix.lower() == ".onnx":
        raise ExportError(f"{args.weights}: is an ONNX file already; --weights takes a checkpoint (.pt)")
    if args.format == "weights":
        return export_weights(args, load_weights_file(args.weights))
    output = Path(args.output or Path(args.weights).with_suffix(".onnx"))
    if output.is_dir():
        raise ExportError(f"{output}: is a folder; --output takes the ONNX file to write")
    print(f"exporting {args.weights} -> {output} (opset {args.opset}, TorchScript exporter, torch {torch.__version__})")
    ckpt = load_weights_file(args.weights)
    model = model_from_checkpoint(ckpt, args.weights).eval()
    tmp = write_onnx(model, ckpt, args.weights, output, args.opset)
    try:
        result = {"output": str(output), "max_abs_logit_diff": None, "argmax_agreement": None}
        if args.check_images > 0:
            images, source = check_images(args.data_path, ckpt["config"], args.check_images)
            diff, agreement = compare(model, OnnxModel(tmp), images)
            result.update(max_abs_logit_diff=diff, argmax_agreement=agreement, checked_on=source)
            print(f"onnxruntime vs PyTorch float32 on {source} at {images.shape[2]}x{images.shape[3]}: largest "
                  f"logit difference {diff:.2e}, argmax agreement {agreement:.4%}")
            if agreement < args.min_agreement:
                raise ExportError(f"{output}: onnxruntime agrees with PyTorch on only {agreement:.4%} of pixels "
                                  f"(< {args.min_agreement:.4%}); nothing written")
        os.replace(tmp, output)
    finally:
        remove_quietly(tmp)
    print(f"wrote {output} ({output.stat().st_size / 2 ** 20:.1f} MiB)")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
