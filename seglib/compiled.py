"""The training step's forward pass and loss as one function, eager or compiled by torch.compile at fixed shapes
(one graph per input size, so progressive resizing compiles once per size and never again), and the portable
compile cache that lets a fresh machine skip most of the compile."""
import time
from pathlib import Path

import torch

from seglib.errors import UsageError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # reduce-overhead: CUDA graphs


class LossFunction:
    """``criterion(model(x), target)`` under autocast (``dtype`` None: float32), as one callable.

    With ``backend`` (a torch.compile backend, e.g. "inductor" or "aot_eager") the function is compiled with
    ``dynamic=False``: a new input shape gets its own graph instead of a dynamic one, and later epochs at a shape
    already seen reuse its graph. ``mode`` "reduce-overhead" replays the step's kernels as CUDA graphs.
    ``is_new_shape`` says whether a call will compile (the step that pays for it is timed by the caller).
    """

    def __init__(self, model, criterion, dtype, backend=None, mode="default"):
        self.model, self.criterion, self.dtype = model, criterion, dtype
        self.compiled = backend is not None
        self._shapes, self._reported = set(), 0
        self._fn = self._loss
        if self.compiled:
            options = {} if mode == "default" else {"mode": mode}
            self._fn = torch.compile(self._loss, backend=backend, dynamic=False, **options)

    def _loss(self, x, target):
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.criterion(self.model(x), target)

    def is_new_shape(self, x):
        """True the first time a compiled function meets ``x``'s shape (that call compiles)."""
        key = tuple(x.shape)
        new = self.compiled and key not in self._shapes
        self._shapes.add(key)
        return new

    def take_new_graphs(self):
        """Whether shapes were compiled since the last call (the compile cache is then worth writing again)."""
        new = len(self._shapes) > self._reported
        self._reported = len(self._shapes)
        return new

    def __call__(self, x, target):
        return self._fn(x, target)


def synchronize(device):
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileTimer:
    """Times the step that compiles a new shape: ``with CompileTimer(loss_fn, x):`` around the step prints
    ``compiled the training step at HxW in N s`` after it (syncing the device only on such steps)."""

    def __init__(self, loss_fn, x, verbose=True):
        self.active = loss_fn is not None and loss_fn.is_new_shape(x)
        self.x, self.verbose, self.seconds = x, verbose, None

    def __enter__(self):
        if self.active:
            synchronize(self.x.device)
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.active and exc[0] is None:
            synchronize(self.x.device)
            self.seconds = time.perf_counter() - self._t0
            if self.verbose:
                h, w = self.x.shape[-2:]
                print(f"compiled the training step at {h}x{w} in {self.seconds:.1f} s", flush=True)
        return False


def load_compile_cache(path):
    """Load torch.compile's portable cache from ``path`` if it exists (torch >= 2.7). Returns whether it did."""
    path = Path(path)
    _check_cache_api(path)
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True


def save_compile_cache(path):
    """Write what torch.compile compiled in this process to ``path`` (temporary name, then rename)."""
    path = Path(path)
    _check_cache_api(path)
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(artifacts[0])
    tmp.replace(path)
    return True


def _check_cache_api(path):
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        raise UsageError(f"--compile-cache {path}: needs torch 2.7 or later (this is {torch.__version__})")
