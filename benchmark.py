"""Measure training and inference throughput of a registered model (the book's FCN by default), its FLOPs and
MFU, and the data pipeline's rate.

Everything is measured in one process, after warm-up: the project's fast settings (bf16 autocast where the
hardware has it, channels_last; for inference also BatchNorm folded into the convs, bf16 weights and, as with
``evaluate.py --compile``, a frozen torch.compile graph; the eager fast path is reported beside it) against
a plain port of the same network in float32 eager mode (stock PyTorch layers, glibc's default malloc), so the
speed-ups are ratios taken side by side. A third measurement, the project's network and allocator setting in
float32 eager mode (``fp32_*``), shows how much of the speed-up is not bf16. The peak of a large matrix
multiply, measured in the same process, gives the model FLOP utilisation (MFU). On the CPU the model exported
by export.py (float32, BatchNorm folded) is timed under onnxruntime too (``onnx_infer_img_s``), at the same size
and batch.

    python benchmark.py --height 240 --width 320 --batch-size 4 --steps 3 --device cpu --json
    python benchmark.py --height 480 --width 640 --batch-size 16 --steps 20 --device cuda --compile
    python benchmark.py --model deeplabv3_mobilenet_v3_large --height 96 --width 128 --device cpu --json
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from data_generator import DataError, build_loader, default_data_path, make_dataset
from evaluate import to_input
from flops import model_gflops
from model_utils import (BASE_LR, amp_dtype, get_device, inference_model, keep_freed_memory, make_grad_scaler,
                         run_cli, seed_everything)
from onnx_model import OnnxModel, export_onnx
from registry import MODELS, build_model, model_options
from resnet import L2_WEIGHT, ConvTranspose2d
from train import build_criterion, build_optimizer, train_step
from train import get_args_parser as train_parser


def sync(device):
    """Wait for queued GPU work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, warmup, device):
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def matmul_peak_gflops(device, dtype, n=4096, steps=5):
    """GFLOP/s of an n x n x n matrix product in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: torch.mm(a, b), steps, 2, device)
    return 2 * n ** 3 / seconds / 1e9


def plain_port(model):
    """``model`` as a plain port writes it: each transposed conv a stock ``nn.ConvTranspose2d`` (bias inside).
    Only the book's FCN has the project's own transposed conv; other models are already stock layers."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvTranspose2d):
                stock = nn.ConvTranspose2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                           child.padding, child.output_padding, child.groups,
                                           child.bias is not None, child.dilation)
                stock.load_state_dict(child.state_dict())
                setattr(module, name, stock)
    return model


def seeded_model(name, device, plain):
    """Model ``name``, seeded, on ``device``, as a plain port (``plain``) or as the project builds it."""
    seed_everything(0)
    model = build_model(name)
    return (plain_port(model) if plain else model).to(device)


def measure_training(args, device, fast, plain=False):
    """Training img/s: fast settings, or float32 eager (``plain``: the plain port)."""
    model = seeded_model(args.model, device, plain)
    dtype = amp_dtype(device) if fast else None
    images = torch.randint(0, 256, (args.batch_size, 3, args.height, args.width), dtype=torch.uint8)
    x = to_input(images, device, channels_last=fast)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (args.batch_size, args.height, args.width), device=device)
    optimizer = build_optimizer(model, BASE_LR, L2_WEIGHT)
    scaler = make_grad_scaler(device, dtype)
    run, criterion = (torch.compile(model) if fast and args.compile else model), build_criterion()

    def step():  # exactly train.py's optimizer step
        train_step(run, criterion, optimizer, scaler, x, y, dtype)

    seconds = timed(step, args.steps, args.warmup, device)
    return args.batch_size / seconds


@torch.inference_mode()
def measure_inference(args, device, fast, plain=False, frozen=False):
    """Inference img/s: fast settings (BN folded, low-precision weights, channels_last; ``frozen``: compiled as
    by ``evaluate.py --compile``), or float32 eager."""
    model = seeded_model(args.model, device, plain).eval()
    dtype = amp_dtype(device) if fast else None
    if fast:
        model = inference_model(model, dtype, channels_last=True, compile=frozen)
    images = torch.randint(0, 256, (args.batch_size, 3, args.height, args.width), dtype=torch.uint8)
    x = to_input(images, device, channels_last=fast, dtype=dtype)
    seconds = timed(lambda: model(x), args.steps, args.warmup, device)
    return args.batch_size / seconds


@torch.inference_mode()
def measure_onnx(args):
    """onnxruntime CPU inference img/s of the model as export.py writes it (float32, BatchNorm folded)."""
    model = seeded_model(args.model, torch.device("cpu"), plain=False).eval()
    config = {"n_classes": 4, "model": args.model, "model_options": model_options(args.model, args),
              "height": args.height, "width": args.width, "class_names": ["0", "1", "2", "3"]}
    with tempfile.TemporaryDirectory() as tmp:
        session = OnnxModel(export_onnx(model, config, Path(tmp) / "model.onnx"))
    images = torch.rand(args.batch_size, 3, args.height, args.width).numpy()
    seconds = timed(lambda: session.run(images), args.steps, args.warmup, torch.device("cpu"))
    return args.batch_size / seconds


def measure_data(args, workers):
    """Training data pipeline img/s (cached decode, rasterised masks, augmentation) with ``workers`` workers."""
    dataset, _ = make_dataset(args.data_path, "train", args.height, args.width, "full", workers=workers)
    loader = build_loader(dataset, args.batch_size, True, workers)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    next(batches)  # workers start
    n, t = 0, time.perf_counter()
    for images, _ in batches:
        n += images.shape[0]
        if n >= args.data_images:
            break
    return n / (time.perf_counter() - t)


def peak_memory_mb(device):
    """Peak GPU memory allocated, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def get_args_parser():
    """Flags of benchmark.py."""
    p = argparse.ArgumentParser(description="Throughput, FLOPs and MFU of a model, fast path against float32 eager.")
    p.add_argument("--model", default="fcn_resnet56v2", choices=MODELS, help="model to measure (registry.py)")
    p.add_argument("--height", type=int, default=240, help="input height")
    p.add_argument("--width", type=int, default=320, help="input width")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast training step")
    p.add_argument("--infer-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="infer_img_s through evaluate.py --compile's frozen graph (needs a C++ compiler on the "
                        "CPU); --no-infer-compile: the eager fast path")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the ONNX export under onnxruntime (CPU only)")
    p.add_argument("--data-path", default=default_data_path(), help="dataset for the data pipeline measurement")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers for the data measurement (default: train.py's default)")
    p.add_argument("--data-images", type=int, default=200, help="images to time the data pipeline on")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p


def main(args):
    """Run every measurement and print a table or one JSON line."""
    device = get_device(args.device)
    workers = train_parser().get_default("workers") if args.workers is None else args.workers
    torch.backends.cudnn.benchmark = True
    fwd_gflops, train_gflops = model_gflops(args.model, args.height, args.width)
    r = {"model": args.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "height": args.height, "width": args.width, "batch_size": args.batch_size, "compile": args.compile,
         "infer_compile": args.infer_compile,
         "autocast": str(amp_dtype(device)),
         "gflops_per_img": round(fwd_gflops, 3), "train_gflops_per_img": round(train_gflops, 3)}
    r["peak_bf16_gflops"] = matmul_peak_gflops(device, torch.bfloat16)
    r["peak_fp32_gflops"] = matmul_peak_gflops(device, torch.float32)
    # the plain port first, while malloc still has glibc's defaults, as a plain script's process has them
    r["baseline_train_img_s"] = measure_training(args, device, fast=False, plain=True)
    r["baseline_infer_img_s"] = measure_inference(args, device, fast=False, plain=True)
    r["keep_freed_memory"] = keep_freed_memory()  # what train.py and evaluate.py do first
    # float32 eager with the project's network and allocator: the part of the speed-up that is not bf16
    r["fp32_train_img_s"] = measure_training(args, device, fast=False)
    r["fp32_infer_img_s"] = measure_inference(args, device, fast=False)
    r["train_img_s"] = measure_training(args, device, fast=True)
    r["infer_eager_img_s"] = measure_inference(args, device, fast=True)
    r["infer_img_s"] = (measure_inference(args, device, fast=True, frozen=True) if args.infer_compile
                        else r["infer_eager_img_s"])
    r["onnx_infer_img_s"] = measure_onnx(args) if args.onnx and device.type == "cpu" else None
    r["train_speedup"] = r["train_img_s"] / r["baseline_train_img_s"]
    r["infer_speedup"] = r["infer_img_s"] / r["baseline_infer_img_s"]
    r["infer_eager_speedup"] = r["infer_eager_img_s"] / r["baseline_infer_img_s"]
    r["train_gflop_s"] = r["train_img_s"] * train_gflops
    r["infer_gflop_s"] = r["infer_img_s"] * fwd_gflops
    r["mfu"] = r["train_gflop_s"] / r["peak_bf16_gflops"]
    r["infer_mfu"] = r["infer_gflop_s"] / r["peak_bf16_gflops"]
    r["baseline_mfu_fp32"] = r["baseline_train_img_s"] * train_gflops / r["peak_fp32_gflops"]
    try:
        r["data_img_s"] = measure_data(args, workers)
    except DataError as e:
        r["data_img_s"], r["data_note"] = None, str(e)
    r["data_workers"] = workers
    r["peak_mem_mb"] = peak_memory_mb(device)
    r["peak_mem_source"] = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    r = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
    if args.json:
        print(json.dumps(r))
        return r
    print(f"{args.model} on {device} ({r['threads']} threads), torch {r['torch']}, {args.height}x{args.width}, batch {args.batch_size}")
    print(f"model: {fwd_gflops:.2f} GFLOPs/img forward, {train_gflops:.2f} forward+backward")
    print(f"matmul peak: bf16 {r['peak_bf16_gflops']:.0f} GFLOP/s, fp32 {r['peak_fp32_gflops']:.0f} GFLOP/s")
    print(f"{'':<12}{'plain fp32':>12}{'fp32':>8}{'fast':>8}{'speed-up':>10}{'GFLOP/s':>10}{'MFU (bf16)':>12}")
    for kind in ("train", "infer"):
        print(f"{kind + ' img/s':<12}{r[f'baseline_{kind}_img_s']:>12.2f}{r[f'fp32_{kind}_img_s']:>8.2f}"
              f"{r[f'{kind}_img_s']:>8.2f}"
              f"{r[f'{kind}_speedup']:>9.2f}x{r[f'{kind}_gflop_s']:>10.0f}"
              f"{r['mfu' if kind == 'train' else 'infer_mfu']:>12.2f}")
    if args.infer_compile:
        print(f"{'infer img/s, eager (no compile)':<32}{r['infer_eager_img_s']:>8.2f}"
              f"{r['infer_eager_speedup']:>9.2f}x")
    if r["onnx_infer_img_s"] is not None:
        print(f"{'infer img/s, onnxruntime fp32':<32}{r['onnx_infer_img_s']:>8.2f}"
              f"{r['onnx_infer_img_s'] / r['baseline_infer_img_s']:>9.2f}x")
    data = "not measured: " + r["data_note"] if r["data_img_s"] is None else f"{r['data_img_s']:.1f} img/s"
    print(f"data pipeline ({workers} workers): {data}; peak memory {r['peak_mem_mb']:.0f} MB")
    return r


if __name__ == "__main__":
    run_cli(main, get_args_parser())
