"""Measure training and inference throughput of a registered model (the book's FCN by default), its FLOPs and
MFU, and the data pipeline's rate.

Everything is measured in one process, after warm-up: the project's fast settings (bf16 autocast, channels_last;
for inference BatchNorm folded, bf16 weights and, as ``evaluate.py --compile``, a frozen torch.compile graph)
against a plain port in float32 eager mode (stock layers, glibc's default malloc), side by side. The project's
network in float32 (``fp32_*``) shows how much of the speed-up is not bf16. A large matrix multiply's peak in
the same process gives the MFU. On the CPU the ONNX export is timed under onnxruntime too (``onnx_infer_img_s``).

    python benchmark.py --height 240 --width 320 --batch-size 4 --steps 3 --device cpu --json
    python benchmark.py --height 480 --width 640 --batch-size 4 --device cuda --no-infer-compile   # the book's size
    python benchmark.py --device cuda --height 480 --width 640 --epoch --profile --json   # end to end, and where
    python benchmark.py --data-only --height 480 --width 640 --workers 1 2 16    # can the loader feed a GPU?
    python benchmark.py --model deeplabv3_mobilenet_v3_large --height 96 --width 128 --device cpu --json
"""
import argparse
import copy
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from data_generator import build_loader, default_data_path, make_dataset
from model_utils import (
    amp_dtype,
    default_workers,
    get_device,
    inference_model,
    keep_freed_memory,
    make_grad_scaler,
    seed_everything,
)
from resnet import L2_WEIGHT, ConvTranspose2d
from seglib.engine import BASE_LR, COMPILE_MODES, LossFunction, build_optimizer, train_step
from seglib.files import DataError, at_least, check_flags, run_cli
from seglib.inference import to_input
from seglib.losses import build_criterion
from seglib.profiling import (
    format_epochs,
    format_profile,
    model_gflops,
    profile_steps,
    release_device_memory,
    time_epochs,
    timed,
    training_gbytes,
)
from seglib.registry import MODELS, build_model, model_options

# Dense bf16 (fp16 where the card has no bf16) tensor-core TFLOP/s from NVIDIA's datasheets, by a part of
# the name torch reports; the first match wins, so the specific names come first
DATASHEET_TFLOPS = (("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("A100", 312),
                    ("L40S", 362), ("L4", 121), ("A10", 125), ("V100", 125), ("T4", 65))


def datasheet_gflops(device):
    """The datasheet's dense bf16/fp16 GFLOP/s of this GPU, or None (a CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e3 for part, tflops in DATASHEET_TFLOPS if part in name), None)


def matmul_peak_gflops(device, dtype):
    """GFLOP/s of a large square matrix product in ``dtype``.

    On a GPU the product is 8192^3 (1.1 TFLOP), timed over 20 calls after 5: a smaller or shorter one leaves
    the GPU below its clocks and the peak too low, which inflates the MFU. The float32 peak uses TF32 where
    cuDNN's convolutions do (``torch.backends.cudnn.allow_tf32``, on by default), so the float32 runs are
    measured against what their convolutions can reach.
    """
    gpu = device.type == "cuda"
    n, steps, warmup = (8192, 20, 5) if gpu else (4096, 5, 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        seconds = timed(lambda: torch.mm(a, b), steps, warmup, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / seconds / 1e9


class StockConvTranspose2d(nn.ConvTranspose2d):
    """A stock ``nn.ConvTranspose2d`` (bias inside the op) with resnet.py's input shift: Keras's 'same' output."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 0, 1, 0)) if self.shift else x)


def plain_port(model):
    """``model`` as a plain port writes it: each transposed conv a stock ``nn.ConvTranspose2d`` (bias inside).
    Only the book's FCN has the project's own transposed conv; other models are already stock layers."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvTranspose2d):
                stock = StockConvTranspose2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                             child.padding, child.output_padding, child.groups,
                                             child.bias is not None, child.dilation)
                stock.load_state_dict(child.state_dict())
                stock.shift = child.shift
                setattr(module, name, stock)
    return model


def seeded_model(name, device, plain):
    """Model ``name``, seeded, on ``device``, as a plain port (``plain``) or as the project builds it."""
    seed_everything(0)
    model = build_model(name)
    return (plain_port(model) if plain else model).to(device)


def training_step(args, device, fast, plain=False):
    """(model, step): one of train.py's optimizer steps on a fixed random batch; fast settings (with --compile,
    its compiled step), or float32 eager (``plain``: the plain port)."""
    model = seeded_model(args.model, device, plain)
    dtype = amp_dtype(device) if fast else None
    images = torch.randint(0, 256, (args.batch_size, 3, args.height, args.width), dtype=torch.uint8)
    x = to_input(images, device, channels_last=fast)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (args.batch_size, args.height, args.width), device=device)
    optimizer = build_optimizer(model, BASE_LR, L2_WEIGHT)
    scaler = make_grad_scaler(device, dtype)
    criterion = build_criterion()
    loss_fn = LossFunction(model, criterion, dtype, "inductor", args.compile_mode) if fast and args.compile else None
    return model, lambda: train_step(model, criterion, optimizer, scaler, x, y, dtype, loss_fn)


def measure_training(args, device, fast, plain=False):
    """Training img/s of ``training_step``."""
    _, step = training_step(args, device, fast, plain)
    return args.batch_size / timed(step, args.steps, args.warmup, device)


def measure_profile(args, device):
    """Where the fast training step's time goes (seglib/profiling.py), after the warm-up steps."""
    model, step = training_step(args, device, fast=True)
    for _ in range(max(1, args.warmup)):
        step()
    return profile_steps(model, step, device, args.steps, by_layer=not args.compile)


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
    from seglib.onnx_model import OnnxModel, export_onnx  # only this measurement needs onnx and onnxruntime

    model = seeded_model(args.model, torch.device("cpu"), plain=False).eval()
    config = {"n_classes": 4, "model": args.model, "model_options": model_options(args.model, args),
              "height": args.height, "width": args.width, "class_names": ["0", "1", "2", "3"]}
    with tempfile.TemporaryDirectory() as tmp:
        session = OnnxModel(export_onnx(model, config, Path(tmp) / "model.onnx"))
    images = torch.rand(args.batch_size, 3, args.height, args.width).numpy()
    seconds = timed(lambda: session.run(images), args.steps, args.warmup, torch.device("cpu"))
    return args.batch_size / seconds


def measure_data(args, dataset, workers):
    """Training data pipeline img/s (cached decode, rasterised masks, full augmentation) with ``workers``
    loader workers."""
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


def measure_data_rates(args, workers):
    """{workers: img/s} of the training data pipeline for each worker count, on one decoded dataset of the images
    it needs (a first batch while the workers start, then ``data_images``)."""
    dataset, _ = make_dataset(args.data_path, "train", args.height, args.width, "full",
                              limit=args.data_images + 2 * args.batch_size, workers=max(1, *workers))
    return {str(w): measure_data(args, dataset, w) for w in workers}


def peak_memory_mb(device):
    """Peak GPU memory allocated since the last ``reset_peak_memory``, or the process's peak resident set on the
    CPU (which cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device):
    """Start a new GPU memory peak, so each measurement reports its own (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def with_peak_memory(r, name, device, measure):
    """``r[name] = measure()``; on a GPU also ``r["peak_mem_mb_by_path"][name]``, that measurement's peak."""
    reset_peak_memory(device)
    r[name] = measure()
    if device.type == "cuda":
        r.setdefault("peak_mem_mb_by_path", {})[name] = round(peak_memory_mb(device), 1)


def get_args_parser():
    """Flags of benchmark.py."""
    p = argparse.ArgumentParser(description="Throughput, FLOPs and MFU of a model, fast path against float32 eager.")
    g = p.add_argument_group("what to measure")
    g.add_argument("--model", default="fcn_resnet56v2", choices=MODELS, help="model to measure (seglib/registry.py)")
    g.add_argument("--height", type=int, default=240, help="input height")
    g.add_argument("--width", type=int, default=320, help="input width")
    g.add_argument("--batch-size", type=int, default=4, help="images per step")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    g.add_argument("--data-only", action="store_true", help="measure only the data pipeline (no model)")
    g.add_argument("--json", action="store_true", help="print one JSON line")
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 3 on a CPU, 20 on a GPU)")
    g.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before each measurement (default: 2 on a CPU, 5 on a GPU, where cuDNN's "
                        "autotuning runs in them)")
    g.add_argument("--compile", action="store_true", help="the fast training step compiled as train.py --compile does")
    g.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode of --compile")
    g.add_argument("--infer-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="infer_img_s through evaluate.py --compile's frozen graph (needs a C++ compiler on the "
                        "CPU); --no-infer-compile: the eager fast path (default: on for a CPU without --compile, "
                        "else off, so a run compiles once at most)")
    g.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the ONNX export under onnxruntime (CPU only)")
    g = p.add_argument_group("where the time goes")
    g.add_argument("--profile", action="store_true", help="also profile the fast training step (where its time goes)")
    g.add_argument("--epoch", action="store_true",
                   help="also time whole epochs of train.py itself (data, steps, validation, checkpoint): epoch_s, "
                        "epoch_img_s and book_run_min, the book's 100 epochs in minutes")
    g.add_argument("--epoch-count", type=int, default=3, help="epochs of the --epoch run; the first is reported apart")
    g.add_argument("--epoch-limit", type=int, default=None,
                   help="training images of the --epoch run (default: the whole split, as a user's run)")
    g.add_argument("--epoch-flags", default="",
                   help="more train.py flags for the --epoch run, as one string, e.g. \"--compile\"")
    g = p.add_argument_group("the data pipeline")
    g.add_argument("--data-path", default=default_data_path(), help="dataset for the data pipeline measurement")
    g.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader worker counts to time the data pipeline with, e.g. 1 2 16 (default: train.py's)")
    g.add_argument("--data-images", type=int, default=200, help="images to time the data pipeline on, per worker count")
    return p


def resolve_args(args, device):
    """Fill in the defaults that depend on the device; returns a new Namespace."""
    args = copy.copy(args)
    gpu = device.type == "cuda"
    args.steps = (20 if gpu else 3) if args.steps is None else args.steps
    args.warmup = (5 if gpu else 2) if args.warmup is None else args.warmup
    args.infer_compile = (not gpu and not args.compile) if args.infer_compile is None else args.infer_compile
    args.workers = [default_workers()] if args.workers is None else args.workers
    return args


def measure_model(args, device, r):
    """Add the model's FLOPs, its training and inference rates on every path, MFU and memory to ``r``."""
    fwd_gflops, train_gflops = model_gflops(args.model, args.height, args.width)
    r.update(gflops_per_img=round(fwd_gflops, 3), train_gflops_per_img=round(train_gflops, 3),
             train_gb_per_img=round(training_gbytes(args.model, args.height, args.width), 3))  # unfused, bf16
    r["peak_bf16_gflops"] = matmul_peak_gflops(device, torch.bfloat16)
    r["peak_fp32_gflops"] = matmul_peak_gflops(device, torch.float32)
    r["peak_bf16_datasheet_gflops"] = datasheet_gflops(device)
    # the plain port first, while malloc still has glibc's defaults, as a plain script's process has them
    with_peak_memory(r, "baseline_train_img_s", device, lambda: measure_training(args, device, False, plain=True))
    with_peak_memory(r, "baseline_infer_img_s", device, lambda: measure_inference(args, device, False, plain=True))
    r["keep_freed_memory"] = keep_freed_memory()  # what train.py and evaluate.py do first
    # float32 eager with the project's network and allocator: the part of the speed-up that is not bf16
    with_peak_memory(r, "fp32_train_img_s", device, lambda: measure_training(args, device, fast=False))
    with_peak_memory(r, "fp32_infer_img_s", device, lambda: measure_inference(args, device, fast=False))
    with_peak_memory(r, "train_img_s", device, lambda: measure_training(args, device, fast=True))
    train_peak = peak_memory_mb(device)
    with_peak_memory(r, "infer_eager_img_s", device, lambda: measure_inference(args, device, fast=True))
    if args.infer_compile:
        with_peak_memory(r, "infer_img_s", device, lambda: measure_inference(args, device, fast=True, frozen=True))
    else:
        r["infer_img_s"] = r["infer_eager_img_s"]
    r["onnx_infer_img_s"] = measure_onnx(args) if args.onnx and device.type == "cpu" else None
    r["train_speedup"] = r["train_img_s"] / r["baseline_train_img_s"]
    r["infer_speedup"] = r["infer_img_s"] / r["baseline_infer_img_s"]
    r["infer_eager_speedup"] = r["infer_eager_img_s"] / r["baseline_infer_img_s"]
    r["train_gflop_s"] = r["train_img_s"] * train_gflops
    r["infer_gflop_s"] = r["infer_img_s"] * fwd_gflops
    r["mfu"] = r["train_gflop_s"] / r["peak_bf16_gflops"]
    r["infer_mfu"] = r["infer_gflop_s"] / r["peak_bf16_gflops"]
    r["mfu_peak_source"] = "measured bf16 matmul (matmul_peak_gflops)"
    datasheet = r["peak_bf16_datasheet_gflops"]
    r["mfu_datasheet"] = r["train_gflop_s"] / datasheet if datasheet else None
    r["baseline_mfu_fp32"] = r["baseline_train_img_s"] * train_gflops / r["peak_fp32_gflops"]
    # on a GPU the fast training step's own peak; on a CPU the process's, which cannot be reset between paths
    r["peak_mem_mb"] = train_peak if device.type == "cuda" else peak_memory_mb(device)
    r["peak_mem_source"] = ("torch.cuda.max_memory_allocated, fast training" if device.type == "cuda"
                            else "ru_maxrss, whole process")


def print_table(r, args):
    """The measurements of ``r`` as a readable table."""
    print(f"{args.model} on {r['device']} ({r['threads']} threads), torch {r['torch']}, {args.height}x{args.width}, "
          f"batch {args.batch_size}, {args.steps} steps after {args.warmup}")
    if "train_img_s" in r:
        print(f"model: {r['gflops_per_img']:.2f} GFLOPs/img forward, {r['train_gflops_per_img']:.2f} forward+backward, "
              f"{r['train_gb_per_img']:.2f} GB/img moved by forward+backward unfused in bf16")
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
        if r["mfu_datasheet"] is not None:
            print(f"MFU against the datasheet's {r['peak_bf16_datasheet_gflops'] / 1e3:.0f} TFLOP/s: "
                  f"{r['mfu_datasheet']:.3f}")
        print(f"peak memory: {r['peak_mem_mb']:.0f} MB ({r['peak_mem_source']})")
        for name, mb in r.get("peak_mem_mb_by_path", {}).items():
            print(f"  {name:<24}{mb:>10.0f} MB")
    if r["data_img_s"] is None:
        print(f"data pipeline: not measured: {r['data_note']}")
    else:
        rates = ", ".join(f"{w} workers {v:.1f} img/s" for w, v in r["data_img_s_by_workers"].items())
        print(f"data pipeline at {args.height}x{args.width}, full augmentation: {rates}")


def rounded(value):
    """``value`` with every float in it, nested dicts too, rounded to 4 decimals."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def main(args):
    """Run every measurement and print a table or one JSON line."""
    check_flags(args, [at_least("--height", 32), at_least("--width", 32), at_least("--batch-size", 1),
                       at_least("--steps", 1), at_least("--warmup", 0), at_least("--workers", 0),
                       at_least("--data-images", 1), at_least("--epoch-count", 2), at_least("--epoch-limit", 1)])
    device = get_device(args.device)
    args = resolve_args(args, device)
    torch.backends.cudnn.benchmark = True
    r = {"model": args.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "height": args.height, "width": args.width, "batch_size": args.batch_size, "steps": args.steps,
         "warmup": args.warmup, "compile": args.compile, "infer_compile": args.infer_compile,
         "autocast": str(amp_dtype(device))}
    if device.type == "cuda":
        r["gpu"] = torch.cuda.get_device_name(device)
    if not args.data_only:
        measure_model(args, device, r)
    if args.profile and not args.data_only:
        r["profile"] = measure_profile(args, device)
    if args.epoch:
        release_device_memory(device)  # train.py, a child process, needs the GPU memory this one cached
        r.update(time_epochs(Path(__file__).resolve().parent / "train.py", args.data_path, args.height, args.width,
                             args.batch_size, args.epoch_count, str(device), args.epoch_limit, args.epoch_flags))
    try:
        r["data_img_s_by_workers"] = measure_data_rates(args, args.workers)
        r["data_img_s"] = r["data_img_s_by_workers"][str(args.workers[-1])]
    except DataError as e:
        r["data_img_s"], r["data_note"] = None, str(e)
    r["data_workers"] = args.workers[-1]
    r = rounded(r)
    if args.json:
        print(json.dumps(r))
    else:
        print_table(r, args)
        if "profile" in r:
            print(format_profile(r["profile"]))
        if "epoch_s" in r:
            print(format_epochs(r))
    return r


if __name__ == "__main__":
    run_cli(main, get_args_parser())
