"""Where one training step's time goes: torch.profiler over a few steps, each kernel (on a GPU) or leaf operator
(on the CPU, each operator's own time, without its children's) put into a category (convolution forward, data
gradient, weight gradient, BatchNorm, pointwise, optimizer, copies, ...) and a layer group (stem, each stage,
pyramid, head, loss), plus the device's idle time between kernels."""
import time
from collections import defaultdict

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from seglib.compiled import synchronize

GROUP_PREFIX = "group:"


def timed(fn, steps, warmup, device):
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls, the device synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
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
