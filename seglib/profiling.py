"""Where a step's time and FLOPs go: ``timed``, the one step timer; torch.profiler over a few steps, each
kernel (on a GPU) or leaf operator (on the CPU, its own time) put into a category and a layer group, with the
device's idle time; FLOPs counted by torch's FlopCounterMode; and whole epochs of train.py timed from its
metrics."""

import gc
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from model_utils import synchronize
from seglib.files import TrainingError
from seglib.registry import build_model

# ----------------------------------------------------------------------------------------- step time and its profile

GROUP_PREFIX = "group:"


def timed(fn, steps, warmup, device, median=False):
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls, the device synchronised: the mean
    (the device kept busy from call to call), or with ``median`` the median of the calls timed one by one (an
    estimate that one slow call must not move)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if median:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / steps

# the first rule whose words appear in the lower-cased kernel or operator name decides its category
RULES = (
    ("optimizer", ("adam", "_foreach", "multi_tensor", "fused_adam")),
    ("conv weight grad", ("wgrad", "backward_weight", "grad_weight")),
    ("conv data grad", ("dgrad", "backward_input", "grad_input")),
    ("conv backward (data + weight)", ("convolution_backward",)),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution forward", ("conv", "fprop", "implicit_gemm", "xmma", "cutlass", "gemm", "winograd")),
    ("loss", ("nll", "softmax", "cross_entropy", "lovasz", "sort")),
    ("upsample", ("upsample", "interpolate")),
    ("copies", ("copy", "memcpy", "memset", "_to_copy", "contiguous", "cat", "clone", "fill")),
    ("pointwise", ("elementwise", "relu", "threshold", "add", "mul", "div", "where", "triton_poi", "pow",
                   "sqrt", "unrolled", "reduce", "sum", "mean", "triton_red", "triton_per")),
)


def categorise(name):
    """The category of a kernel or operator ``name`` (see RULES); "other" when no rule matches."""
    low = name.lower()
    for category, words in RULES:
        if any(w in low for w in words):
            return category
    return "other"


def layer_groups(model):
    """(name, module) of the model's layer groups: the backbone's stem and each stage, then its other top-level
    parts (the book's FCN: pyramid, lateral, up, classifier); any other model's top-level children."""
    backbone = getattr(model, "backbone", None)
    groups = []
    if backbone is not None and hasattr(backbone, "stem") and hasattr(backbone, "stages"):
        groups = [("stem", backbone.stem)] + [(f"stage{i + 1}", s) for i, s in enumerate(backbone.stages)]
        groups += [(f"backbone.{n}", m) for n, m in backbone.named_children() if n not in ("stem", "stages")]
        return groups + [(n, m) for n, m in model.named_children() if n != "backbone"]
    return list(model.named_children())


def mark_groups(model):
    """Wrap each layer group's forward in a profiler range named GROUP_PREFIX + name; returns the hook handles."""
    handles = []
    for name, module in layer_groups(model):
        ranges = []
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name, ranges=ranges: ranges.append(record_function(GROUP_PREFIX + name).__enter__())))
        handles.append(module.register_forward_hook(
            lambda m, a, out, ranges=ranges: ranges.pop().__exit__(None, None, None)))
    return handles


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def _group_and_phase(event, group_of_seq):
    """(layer group, phase) of a CPU operator: forward ops lie in a group's range; backward ops share their
    autograd sequence number with the forward op they differentiate."""
    names = [e.name for e in _ancestors(event)]
    if any(n.startswith("autograd::engine::evaluate_function") for n in names):
        seqs = [e.sequence_nr for e in _ancestors(event) if getattr(e, "sequence_nr", -1) >= 0]
        return (group_of_seq.get(seqs[0], "loss") if seqs else "loss"), "backward"
    if "optimizer" in names:
        return "optimizer", "optimizer"
    groups = [n[len(GROUP_PREFIX):] for n in names if n.startswith(GROUP_PREFIX)]
    return (groups[0] if groups else "loss"), "forward"


def _busy_us(intervals):
    """Microseconds covered by the union of (start, end) intervals."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


COMPILED_GROUP = "whole model (compiled)"


def profile_steps(model, step, device, steps=3, by_layer=True):
    """Profile ``steps`` calls of ``step()`` (forward in a "forward" range; optimizer in an "optimizer" range,
    see seglib.engine.train_step's callers) after the caller's warm-up.

    The step's wall time is timed first, with the profiler off, so that the idle time does not count the
    profiler's own overhead. ``by_layer=False`` for a compiled step: compiled code skips the layer groups' ranges
    and fuses kernels across layers, so its time is split by category and phase only (group COMPILED_GROUP).
    Returns {"rows": [{category, group, phase, ms}], "step_ms", "busy_ms", "idle_ms", "source"}: per step, on a
    GPU the kernels' device time, on the CPU the operators' own CPU time.
    """
    wall_ms = timed(step, steps, 0, device) * 1e3
    handles = mark_groups(model) if by_layer else []
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronize(device)
    finally:
        for h in handles:
            h.remove()
    events = prof.events()
    group_of_seq = {}
    for e in events:
        if e.device_type == DeviceType.CPU and getattr(e, "sequence_nr", -1) >= 0:
            group, phase = _group_and_phase(e, {})
            if phase == "forward":
                group_of_seq.setdefault(e.sequence_nr, group)
    totals, intervals = defaultdict(float), []
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if cuda:
            for k in e.kernels:
                totals[(categorise(k.name), *_group_and_phase(e, group_of_seq))] += k.duration / 1e3
        elif not e.name.startswith(GROUP_PREFIX) and e.name not in ("forward", "optimizer"):  # own time only
            totals[(categorise(e.name), *_group_and_phase(e, group_of_seq))] += e.self_cpu_time_total / 1e3
    if cuda:
        intervals = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    if not by_layer:  # the forward's range and the backward's sequence numbers name no layer in compiled code
        merged = defaultdict(float)
        for (c, g, p), ms in totals.items():
            merged[(c, g if p == "optimizer" else COMPILED_GROUP, p)] += ms
        totals = merged
    rows = [{"category": c, "group": g, "phase": p, "ms": ms / steps} for (c, g, p), ms in totals.items()]
    rows.sort(key=lambda r: -r["ms"])
    busy = _busy_us(intervals) / 1e3 / steps if cuda else sum(r["ms"] for r in rows)
    return {"rows": rows, "step_ms": wall_ms, "busy_ms": busy, "idle_ms": max(0.0, wall_ms - busy),
            "source": "CUDA kernels' device time" if cuda else "operators' own CPU time"}


def summarise(profile_result, key):
    """{value of ``key`` ("category", "group" or "phase"): ms per step}, largest first."""
    sums = defaultdict(float)
    for r in profile_result["rows"]:
        sums[r[key]] += r["ms"]
    return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def format_profile(p):
    """The profile as text tables: by category, by layer group and phase, and the idle time."""
    lines = [f"one training step: {p['step_ms']:.1f} ms wall, {p['busy_ms']:.1f} ms busy ({p['source']}), "
             f"{p['idle_ms']:.1f} ms idle or host overhead"]
    for key in ("category", "group", "phase"):
        lines.append(f"{'by ' + key:<34}{'ms':>9}{'share':>8}")
        for name, ms in summarise(p, key).items():
            lines.append(f"  {name:<32}{ms:>9.2f}{ms / max(p['step_ms'], 1e-9):>8.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- FLOPs and bytes
# FLOPs counted by torch.utils.flop_counter on a forward and a backward pass (benchmark.py's GFLOPs and MFU,
# curves.py's models figure), and the bytes a training step moves when every operator reads its inputs and writes
# its outputs (the unfused figure of RESULTS.md's roofline).

def conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                       output_padding, groups, output_mask, out_shape=None):
    """FLOPs of a conv's backward: the input gradient and the weight gradient each cost the forward's
    2 * batch * weight size * positions the kernel visits (the output's for a conv, the input's for a transposed
    conv). torch.utils.flop_counter's own formula counts a grouped conv's weight gradient as if the conv were
    dense, ``groups`` times too much, which would inflate a depthwise-separable network (MobileNetV3) many-fold."""
    positions = math.prod((x_shape if transposed else grad_out_shape)[2:])
    one = 2 * grad_out_shape[0] * math.prod(w_shape) * positions
    return one * (int(output_mask[0]) + int(output_mask[1]))


def _cross_entropy_on_class_0(logits):
    target = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long, device=logits.device)  # (B, H, W)
    return F.cross_entropy(logits, target)


def step_gflops(model, height, width, loss=None):
    """(forward, forward + backward) GFLOPs per image of ``model``, built on the ``meta`` device: shapes only, no
    arithmetic and no memory, so counting at 480x640 costs what it costs at 96x128. torch.utils.flop_counter
    counts, with ``conv_backward_flop`` for the convs' backward. ``loss`` turns the output into the scalar the
    backward starts from: cross-entropy against class 0 by default; a part of a model (a backbone alone) can
    pass ``lambda out: out.sum()``."""
    loss = loss or _cross_entropy_on_class_0
    x = torch.rand(2, 3, height, width, device="meta")  # 2 images: train-mode BatchNorm needs more than one value
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    forward = fwd.get_total_flops() / 2
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as bwd:
        loss(out).backward()
    return forward / 1e9, (forward + bwd.get_total_flops() / 2) / 1e9


def model_gflops(name, height, width, n_classes=4):
    """(forward, forward + backward) GFLOPs per image of registered model ``name`` (see ``step_gflops``)."""
    with torch.device("meta"):
        model = build_model(name, n_classes)
    return step_gflops(model, height, width)


def _tensor_bytes(values):
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


def _is_view(func):
    """Whether an aten operator returns a view of an input (no data moved) rather than new or rewritten data."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class ByteCounter(TorchDispatchMode):
    """Counts the bytes each aten operator reads (its tensor arguments) and writes (its tensor results), views
    left out: the traffic of a step in which no two operators share a pass over memory."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _is_view(func):
            self.read += _tensor_bytes((args, kwargs))
            self.written += _tensor_bytes(out)
        return out


def training_gbytes(name, height, width, n_classes=4, dtype=torch.bfloat16):
    """GB per image that a forward and backward pass of model ``name`` reads and writes, unfused, with weights
    and activations in ``dtype`` (what autocast runs the convs in), counted on the ``meta`` device."""
    with torch.device("meta"):
        model = build_model(name, n_classes).to(dtype)
        x = torch.rand(2, 3, height, width, dtype=dtype)
        target = torch.zeros(2, height, width, dtype=torch.long)
    with ByteCounter() as counter:
        F.cross_entropy(model(x), target).backward()
    return (counter.read + counter.written) / 2 / 1e9


# ------------------------------------------------------------------------------------------ whole epochs of train.py
# train.py itself run for a few epochs (data, steps, validation, checkpoints, curves), timed from the wall-clock
# stamps of its metrics.jsonl, so the figure is what a user's run gets.

def train_command(script, data_path, out_dir, height, width, batch_size, epochs, device=None, limit=None,
                  extra=""):
    """The train.py command line of a timed run: the book's recipe at this size, no final test, outputs in
    ``out_dir``; ``extra`` (a string, shell-split) adds flags such as ``--compile``."""
    cmd = [sys.executable, str(script), "--data-path", str(data_path), "--output-dir", str(out_dir / "weights"),
           "--figures-dir", str(out_dir / "figures"), "--run-name", "timed", "--epochs", str(epochs),
           "--height", str(height), "--width", str(width), "--batch-size", str(batch_size), "--no-test"]
    cmd += ["--device", device] if device else []
    cmd += ["--limit", str(limit)] if limit else []
    return cmd + shlex.split(extra)


def epoch_figures(rows, started):
    """Timing of a run from its metrics rows and its start (unix seconds).

    Each row's ``time`` is when its epoch's validation ended; the interval between two rows is one whole epoch
    as the run sees it, the epoch-end work (checkpoint snapshot, curves) included. The first epoch also pays for
    warm-up (cuDNN's autotuning, compiling) and is reported apart.
    """
    times = [r["time"] for r in rows]
    steady = [b - a for a, b in zip(times, times[1:])]
    epoch_s = sum(steady) / len(steady)
    images = rows[-1]["train_images"]
    return {"epochs_timed": len(rows), "startup_s": times[0] - started - rows[0]["seconds"],
            "first_epoch_s": rows[0]["seconds"], "epoch_s": epoch_s, "epoch_img_s": images / epoch_s,
            "epoch_train_images": images, "epoch_s_each": steady,
            "book_run_min": (rows[0]["seconds"] + 99 * epoch_s) / 60}


def time_epochs(script, data_path, height, width, batch_size, epochs=3, device=None, limit=None, extra="",
                keep_dir=None):
    """Run train.py (``script``) for ``epochs`` (at least 2) and return ``epoch_figures`` plus the command.
    TrainingError, with the end of its output, if the run fails."""
    with tempfile.TemporaryDirectory(dir=keep_dir) as tmp:
        out = Path(tmp)
        cmd = train_command(script, data_path, out, height, width, batch_size, epochs, device, limit, extra)
        started = time.time()
        result = subprocess.run(cmd, cwd=Path(script).parent, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise TrainingError(f"{script}: the timed run failed (exit {result.returncode}): " + " | ".join(tail))
        metrics = out / "weights" / "timed" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        compiles = [line for line in result.stdout.splitlines() if line.startswith("compiled the training step")]
    return {**epoch_figures(rows, started), "command": " ".join(shlex.quote(c) for c in cmd[1:]),
            "compile_lines": compiles}


def format_epochs(r):
    """One line of the --epoch figures in ``r``."""
    return (f"train.py, {r['epochs_timed']} epochs of {r['epoch_train_images']} images: {r['epoch_s']:.2f} s an "
            f"epoch, {r['epoch_img_s']:.1f} img/s end to end (first epoch {r['first_epoch_s']:.1f} s); the book's "
            f"100 epochs: {r['book_run_min']:.1f} min")


def release_device_memory(device):
    """Hand back what this process holds on ``device`` before train.py runs as a child: the compiled graphs
    (CUDA graphs' memory pools among them) and the allocator's cached blocks. Nothing to do on the CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.compiler.reset()
        torch.cuda.empty_cache()
