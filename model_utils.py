"""What every run needs around the model: seeding and RNG states, devices and mixed precision (with the fast
inference form of a model), loader workers, device synchronisation and distributed set-up. Checkpoints are read
and written by seglib/checkpoints.py; the one error raised here, UsageError, lives with the others in
seglib/files.py."""
import copy
import ctypes
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from seglib.files import UsageError


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


# --------------------------------------------------------------------------------------------------- checkpoints









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
        torch.cuda.set_rng_state(this_gpus_rng_state(cuda))


def this_gpus_rng_state(saved):
    """The CUDA RNG state to restore on this process's GPU from a checkpoint's: the state itself, or the first
    of a list of one state per GPU (checkpoints written before states were saved per process)."""
    return (saved[0] if isinstance(saved, (list, tuple)) else saved).cpu()


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
    """``torch.device(name)``, or the best available: cuda, then mps, then cpu. UsageError (naming ``--device``)
    for a name torch does not know or a device this machine does not have."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps)") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise UsageError(f"--device {name}: this machine has no {device.type} device")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
        return device
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

    Feed it inputs of the same dtype and layout (see seglib.inference.to_input); the original model is untouched.
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


def synchronize(device):
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
