"""Training utilities: checkpoints, seeding, devices, mixed precision,
distributed setup and segmentation metrics."""
import copy
import ctypes
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from data_generator import DataError
from registry import DEFAULT_MODEL, ModelError, build_model

BASE_LR = 1e-3
CONFIG_KEYS = ("n_classes", "height", "width", "class_names")


class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint; the message names the file."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says why and what was kept."""


class ExportError(RuntimeError):
    """An export that cannot be written or does not match the model; the message names the file."""


USER_ERRORS = (DataError, CheckpointError, TrainingError, ExportError, ModelError)


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel. Linux only.

    A CPU training step allocates and frees activations of up to hundreds of MB each. By default glibc serves
    such blocks with mmap and unmaps them on free (and gives each thread its own arena), so every step
    page-faults ~2 GB back in: a third of a step at 240x320, batch 4. With one arena, no mmap and no
    trimming, the heap grows to a step's peak once and is then reused. Call it before the work starts (new
    threads join the one arena; threads that already have one keep it). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # from glibc's malloc.h
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1))  # a threshold of -1: never trim
    return all(mallopt(option, value) == 1 for option, value in settings)


def run_cli(main, parser):
    """Run ``main(parser.parse_args())``; a user error becomes one line on stderr and exit status 1."""
    try:
        main(parser.parse_args())
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


# --------------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path):
    """``torch.save`` to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (``weights_only=True``: plain tensors and containers, no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' and 'config' entries)")
    missing = [k for k in CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{path}: checkpoint config lacks {', '.join(missing)}")
    return ckpt


def has_ema(ckpt):
    """Whether a checkpoint carries EMA weights (train.py --ema)."""
    return isinstance(ckpt.get("ema"), dict)


def checkpoint_model(cfg):
    """(model name, its options) of a checkpoint's config. A config without a model name was written before the
    registry existed: it is the book's FCN, whose options (depth, n_layers) are then top-level keys."""
    if "model" in cfg:
        return cfg["model"], dict(cfg.get("model_options", {}))
    return DEFAULT_MODEL, {"depth": cfg["depth"], "n_layers": cfg["n_layers"]}


def model_from_checkpoint(ckpt, path="checkpoint", ema=True):
    """Build the model a checkpoint describes and load its weights: the EMA weights when the run kept an EMA
    (those are the ones it validated) unless ``ema`` is False; CheckpointError if they do not fit."""
    cfg = ckpt["config"]
    weights = ckpt["ema"]["model"] if ema and has_ema(ckpt) else ckpt["model"]
    try:
        name, options = checkpoint_model(cfg)
    except KeyError as e:
        raise CheckpointError(f"{path}: checkpoint config names no model and lacks {e}") from None
    try:
        model = build_model(name, cfg["n_classes"], **options)
    except ModelError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({first_line})") from None
    return model


def rng_state():
    """Python, NumPy and torch RNG states, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only: a run resumed on fewer GPUs than it was saved from must find it
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what ``rng_state`` returned, whatever device its tensors were loaded onto.

    The CUDA state goes to this process's GPU. A checkpoint written before states were saved per process holds
    a list, one per GPU the run saw: its first entry is used, so it resumes on any number of GPUs.
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state((cuda[0] if isinstance(cuda, (list, tuple)) else cuda).cpu())


# --------------------------------------------------------------------------------------------------- devices

def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and torch; with ``deterministic``, also ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels


def default_workers(cap=8):
    """Data loader workers per process: this machine's cores shared among its training processes (torchrun's
    LOCAL_WORLD_SIZE), at most ``cap``, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def get_device(name=None):
    """``torch.device(name)``, or the best available: cuda, then mps, then cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16():
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX), so bf16 is fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_bf16(device):
    """Whether the GPU has native bf16 tensor cores (compute capability 8.0, Ampere, or later).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (T4, V100), which is slower
    there than fp16 with loss scaling.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype(device, enabled=True):
    """Mixed-precision dtype for ``device``: bf16 where supported, fp16 on GPUs without bf16, else None."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    return None


def make_grad_scaler(device, dtype):
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def restore_grad_scaler(scaler, state):
    """Load a saved GradScaler state into ``scaler``. A run saved under bf16 or on a CPU saved a disabled
    scaler's empty state: an fp16 run resuming it starts its scaler afresh (loss scale 65536), as a new run."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def inference_model(model, dtype=None, channels_last=True, compile=False):
    """A copy of ``model`` made fast for inference: eval mode, BatchNorm folded into the preceding convs,
    weights cast to ``dtype`` (bf16/fp16, so no per-call autocast casts) and channels_last layout;
    ``compile`` wraps it in a ``FrozenInference`` graph.

    Feed it inputs of the same dtype and layout (see evaluate.to_input); the original model is untouched.
    """
    fast = copy.deepcopy(model).eval()
    fast.fuse_bn_()
    if dtype is not None:
        fast = fast.to(dtype)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return FrozenInference(fast) if compile else fast


class FrozenInference(nn.Module):
    """``module`` compiled by torch.compile with inductor's freezing, for inference under ``torch.inference_mode``.

    Freezing turns the weights into constants, so each conv gets prepacked oneDNN weights on the CPU and the
    ReLU or residual add after it runs inside the conv. The first call compiles (seconds; a C++ compiler is
    needed on the CPU). The weights must stay as they are after that call: the graph is built around them.
    """

    def __init__(self, module):
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, x):
        torch._dynamo.maybe_mark_dynamic(x, 0)  # one graph for every batch size, a short last batch included
        with torch._inductor.config.patch(freezing=True):  # read when the graph compiles, so set at every call
            return self.compiled(x)


@dataclass
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_name=None):
    """Set up DDP from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPU, gloo on CPU).

    Returns (DistInfo, device). Without those variables it is a single process on ``get_device``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(), get_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def barrier(device):
    """Wait for every rank (no-op in a single process). Under NCCL the barrier runs on this process's GPU: left
    to guess, NCCL picks a device by rank, which is not always the one this process uses."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(model):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, so after the last training step each rank holds its own
    update. Validating without this would score a different model on each rank from the one rank 0 saves.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------------------------------- metrics

def confusion_matrix(pred, target, n_classes):
    """(n_classes, n_classes) int64 counts, rows ground truth, columns prediction.

    A scatter-add rather than ``torch.bincount``, which on a GPU reads the largest index back to the host (a
    sync per image); this stays on the device.
    """
    idx = target.reshape(-1).long() * n_classes + pred.reshape(-1).long()
    counts = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    return counts.reshape(n_classes, n_classes)


def _safe_div(num, den):
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))


class SegmentationMetrics:
    """Accumulates both metric definitions over images.

    - The book's: per image, IoU averaged over the classes present in its ground truth, then averaged over
      images (``miou_per_image``), and per-image pixel accuracy averaged over images.
    - The dataset-level one: a confusion matrix over all pixels gives per-class IoU; ``miou`` is their mean
      over classes present in the ground truth or the predictions.
    """

    def __init__(self, n_classes, device="cpu"):
        self.n_classes = n_classes
        self.confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=device)
        # sum of per-image mIoU, sum of per-image pixel accuracy, number of images
        self.per_image = torch.zeros(3, dtype=torch.float64, device=device)
        self.image_ious = []

    def update(self, pred, target):
        """Add one image: ``pred`` and ``target`` are (H, W) class maps of the same size."""
        conf = confusion_matrix(pred, target, self.n_classes)
        self.confusion += conf
        iou = self.image_iou(conf)
        self.image_ious.append(iou)
        acc = conf.diagonal().sum().double() / conf.sum().clamp(min=1)
        self.per_image += torch.stack([iou, acc, torch.ones((), dtype=torch.float64, device=acc.device)])

    @staticmethod
    def image_iou(conf):
        """The book's per-image mIoU: mean IoU over the classes present in the image's ground truth."""
        conf = conf.double()
        tp, gt, pr = conf.diagonal(), conf.sum(1), conf.sum(0)
        present = gt > 0  # so union > 0 too; masking with where avoids a host sync on GPU
        iou = torch.where(present, tp / (gt + pr - tp).clamp(min=1), torch.zeros_like(tp))
        return iou.sum() / present.sum().clamp(min=1)

    def all_reduce(self):
        """Sum the counts over all ranks (each image was seen by exactly one rank)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion)
            dist.all_reduce(self.per_image)

    def compute(self, class_names=None):
        """A dict of plain floats: both mIoU definitions, pixel accuracies, per-class rows and n_images."""
        conf = self.confusion.double().cpu()
        tp, gt, pr = conf.diagonal(), conf.sum(1), conf.sum(0)
        iou = _safe_div(tp, gt + pr - tp)
        acc = _safe_div(tp, gt)
        n_images = int(self.per_image[2].item())
        names = class_names or [str(c) for c in range(self.n_classes)]
        total = max(gt.sum().item(), 1.0)
        return {
            "miou_per_image": self.per_image[0].item() / max(n_images, 1),
            "pixel_accuracy_per_image": self.per_image[1].item() / max(n_images, 1),
            "miou": iou[(gt + pr) > 0].mean().item(),
            "pixel_accuracy": (tp.sum() / conf.sum().clamp(min=1)).item(),
            "mean_class_accuracy": acc[gt > 0].mean().item(),
            "per_class": [{"name": names[c], "iou": _num(iou[c]), "accuracy": _num(acc[c]),
                           "share": gt[c].item() / total} for c in range(self.n_classes)],
            "n_images": n_images,
        }


def _num(x):
    """A float, or None for NaN (JSON has no NaN)."""
    x = float(x)
    return None if x != x else x


def format_metrics_table(metrics):
    """The per-class table and the summary lines, as a string."""
    lines = [f"{'class':<12}{'IoU':>8}{'accuracy':>10}{'pixels':>9}"]
    for row in metrics["per_class"]:
        iou = "-" if row["iou"] is None else f"{row['iou']:.4f}"
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['name']:<12}{iou:>8}{acc:>10}{row['share']:>9.2%}")
    lines.append(f"mIoU per image (book): {metrics['miou_per_image']:.4f}   "
                 f"pixel accuracy per image: {metrics['pixel_accuracy_per_image']:.4f}")
    lines.append(f"mIoU (dataset): {metrics['miou']:.4f}   pixel accuracy: {metrics['pixel_accuracy']:.4f}   "
                 f"mean class accuracy: {metrics['mean_class_accuracy']:.4f}   images: {metrics['n_images']}")
    return "\n".join(lines)
