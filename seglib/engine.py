"""The training step and what drives it: Adam as Keras computes it, the learning-rate schedules, the EMA of
the weights, the optionally compiled loss-and-backward, one optimizer step, one epoch with its Ctrl-C handling and
periodic loss checks, and the CPU run's time estimate."""

import copy
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import distributed as dist
from torch.nn import functional as F
from torch.profiler import record_function

from model_utils import make_grad_scaler, synchronize
from seglib.files import TrainingError, UsageError, progress
from seglib.inference import to_input, tta_cost
from seglib.profiling import timed
from seglib.recipes import epoch_sizes

# ------------------------------------------------------------------------------------------- learning-rate schedules
# The book's step schedule, the same scaled to the run, cosine and poly, each with an optional linear warmup. Every
# rate is a pure function of the global optimizer step (and the run's length), set before each step, so a resumed
# run sets exactly the rates an uninterrupted run sets.

BASE_LR = 1e-3  # Adam's base rate in the book

SCHEDULES = ("book", "scaled", "cosine", "poly")
POLY_POWER = 0.9  # torchvision's segmentation references and MMSegmentation


def lr_scheduler(epoch, base_lr=BASE_LR, epochs=100):
    """The book's step schedule: base until epoch 40, then x0.5, x0.1 after 60, x0.05 after 80 (0-based).

    ``epochs`` other than the book's 100 scales the steps to the run's length (40%, 60%, 80% of it), so a
    short run decays too.
    """
    scale = epochs / 100
    if epoch > 80 * scale:
        return base_lr * 0.05
    if epoch > 60 * scale:
        return base_lr * 0.1
    if epoch > 40 * scale:
        return base_lr * 0.5
    return base_lr


def learning_rate(schedule, step, steps_per_epoch, epochs, base_lr=BASE_LR, warmup_epochs=0.0):
    """The rate for global step ``step`` (0-based: the step about to be taken).

    - ``book``: the book's steps at epochs 40, 60, 80 whatever the run's length; ``scaled``: the same at 40%,
      60%, 80% of ``epochs`` (both change once per epoch);
    - ``cosine``: from ``base_lr`` down to 0 along half a cosine over the steps after the warmup;
    - ``poly``: ``base_lr * (1 - t) ** 0.9`` over the same steps (t from 0 to 1).

    ``warmup_epochs`` (may be fractional) ramps the rate linearly from ``base_lr / warmup_steps`` up to the
    schedule's own over its first steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    warmup = round(warmup_epochs * steps_per_epoch)
    if schedule in ("book", "scaled"):
        lr = lr_scheduler(step // steps_per_epoch, base_lr, 100 if schedule == "book" else epochs)
    else:
        t = min(1.0, max(0, step - warmup) / max(1, epochs * steps_per_epoch - warmup))  # 0 -> 1 after warmup
        lr = base_lr * (0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else (1 - t) ** POLY_POWER)
    return lr * min(1.0, (step + 1) / warmup) if step < warmup else lr


def set_lr(optimizer, lr):
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------ EMA of the weights
# After every optimizer step every floating-point entry of the EMA copy's state (parameters and BatchNorm running
# statistics alike) moves towards the trained model's:
#
#    ema = d * ema + (1 - d) * model,    d = min(decay, (1 + n) / (10 + n)) after n updates,
#
# so the random initial weights fade within the first steps (timm's ModelEmaV2 warmup). Averaging the running
# statistics with the parameters keeps them the statistics of the averaged model; integer buffers are copied.

class ModelEMA:
    """An EMA copy of ``model`` (``module``, in eval mode, no gradients) with ``decay`` per optimizer step."""

    def __init__(self, model, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self):
        """The decay the next update uses: ``decay``, lowered for the first updates."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model):
        """Move the EMA towards ``model``'s current state (call after each optimizer step)."""
        d = self.current_decay()
        ema_state = self.module.state_dict()  # its tensors share the modules' storage
        pairs = [(ema_state[name], value) for name, value in model.state_dict().items()]
        floats = [pair for pair in pairs if pair[1].is_floating_point()]
        ints = [pair for pair in pairs if not pair[1].is_floating_point()]
        # one multi-tensor kernel for all the weights, not one kernel per tensor
        torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1.0 - d)
        if ints:
            torch._foreach_copy_([e for e, _ in ints], [v for _, v in ints])
        self.updates += 1

    def state_dict(self):
        """The EMA weights and the update count, for a checkpoint (plain tensors and ints)."""
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned (exact resume)."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


# ------------------------------------------------------------------------------------------------- the compiled step
# The forward pass and loss as one function, eager or compiled by torch.compile at fixed shapes (one graph per input
# size, so progressive resizing compiles once per size), and the portable compile cache that lets a fresh machine
# skip most of the compile.

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


# ----------------------------------------------------------------------------------------- optimizer, step and epoch

CHECK_EVERY = 10  # steps between host syncs (loss check, progress bar, stop request)


class KerasAdam(torch.optim.Adam):
    """Adam as Keras computes it: epsilon added to sqrt(v) before the bias correction ("epsilon hat").

    Keras updates ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``; torch divides by
    ``sqrt(v / (1 - b2^t)) + eps``. They agree when torch's epsilon at step t is ``eps / sqrt(1 - b2^t)``, which
    this sets before each step. The step count lives in each param group (``keras_step``), so it is saved
    and resumed with the optimizer's state; a step the GradScaler skips is not counted, as in torch's Adam.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-7, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, **kwargs)
        for group in self.param_groups:
            group.setdefault("keras_eps", eps)
            group.setdefault("keras_step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["keras_step"] += 1
            group["eps"] = group["keras_eps"] / (1 - group["betas"][1] ** group["keras_step"]) ** 0.5
        return super().step(closure)


def build_optimizer(model, lr, l2, adam_eps="keras"):
    """The book's Adam (Keras defaults: betas 0.9, 0.999, epsilon 1e-7) with its L2 on the backbone's conv
    kernels as weight decay. ``adam_eps`` "keras" adds epsilon as Keras does (``KerasAdam``), "torch" as torch's
    Adam does; the two differ most in early steps with small gradients.

    Keras adds ``l2 * sum(w**2)`` to the loss, so the gradient gains ``2 * l2 * w``: that is Adam's (coupled)
    weight_decay of ``2 * l2``, on those kernels only.
    """
    decayed = {id(p) for p in model.l2_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in decayed], "weight_decay": 2 * l2},
        {"params": [p for p in model.parameters() if id(p) not in decayed], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    adam = KerasAdam if adam_eps == "keras" else torch.optim.Adam
    return adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-7, fused=fused)


class StopRequest:
    """Turns the first Ctrl-C into a request to stop after the current step; a second one interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving last.pt (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


def train_step(model, criterion, optimizer, scaler, x, target, dtype, loss_fn=None):
    """One optimizer step under autocast (``dtype`` None: float32); returns the loss, without a host sync.

    ``loss_fn`` (a seglib.engine.LossFunction: the forward pass and loss, maybe compiled) replaces
    ``criterion(model(x), target)``.
    """
    # before the forward pass: the last step's gradients are freed before this step's activations are made
    # (under CUDA graphs they would otherwise stay alive through the replay)
    optimizer.zero_grad(set_to_none=True)
    with record_function("forward"):  # profiler ranges (seglib/profiling.py); next to free when not profiling
        if loss_fn is not None:
            loss = loss_fn(x, target)
        else:
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                loss = criterion(model(x), target)
    scaler.scale(loss).backward()
    with record_function("optimizer"):
        scaler.step(optimizer)
        scaler.update()
    return loss


@dataclass
class Trainer:
    """What every training step of a run shares, built once (train.py's ``setup``)."""

    model: torch.nn.Module  # as saved and validated; the EMA follows it
    criterion: Callable  # (logits, target) -> loss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None = None  # the autocast dtype; None: float32
    channels_last: bool = False
    trained: torch.nn.Module | None = None  # the module the steps run (DDP-wrapped); None: ``model``
    loss_fn: LossFunction | None = None  # the forward and loss, maybe compiled (train_step); None: eager
    ema: ModelEMA | None = None  # updated after every step
    is_main: bool = True
    world_size: int = 1
    last_path: Path | None = None  # named when the loss stops being finite
    loss_state: torch.Tensor | None = None  # (2,) float64 on the device: the epoch's summed loss and step count

    def __post_init__(self):
        self.trained = self.model if self.trained is None else self.trained
        if self.loss_state is None:
            self.loss_state = torch.zeros(2, dtype=torch.float64, device=self.device)

    def step(self, x, target):
        """One optimizer step on a batch, then the EMA's; returns the loss tensor (no host sync)."""
        loss = train_step(self.trained, self.criterion, self.optimizer, self.scaler, x, target, self.dtype,
                          self.loss_fn)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss


def train_one_epoch(trainer, loader, epoch, epochs, lr_fn, stop, start_step=0, log_step=None):
    """Train one epoch of ``epochs`` from ``start_step``, setting the rate ``lr_fn(step in epoch)`` before each
    step. Returns (next step, whether a stop was requested). ``loader`` may be a DataLoader or a
    seglib.device_data.DeviceTrainLoader; ``stop`` a StopRequest; ``log_step(step, running loss, lr)`` is called
    where the loop syncs anyway (TensorBoard). A step that compiles a new shape is timed and reported.

    The epoch's loss adds up in ``trainer.loss_state`` on the device. The loop syncs with the host only every
    CHECK_EVERY steps: then it checks the loss is finite, refreshes the progress bar and, when distributed, agrees
    on a stop with the other ranks.
    """
    t = trainer
    t.trained.train()
    steps = start_step + len(loader)
    bar = progress(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}", enabled=t.is_main)
    t0, seen, step = time.perf_counter(), 0, start_step
    for images, masks in loader:
        x = to_input(images, t.device, t.channels_last)  # (B, 3, H, W) float
        target = masks.to(t.device, non_blocking=True).long()  # (B, H, W)
        lr = lr_fn(step)
        set_lr(t.optimizer, lr)
        with CompileTimer(t.loss_fn, x, verbose=t.is_main):
            loss = t.step(x, target)
        t.loss_state += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=t.device)])
        step += 1
        seen += images.shape[0] * t.world_size
        bar.update(1)
        # under DDP every rank must reach the all_reduce below at the same steps, whichever rank saw Ctrl-C and
        # when: a rank that entered it alone would pair it with the others' gradient all_reduce and hang
        if step % CHECK_EVERY == 0 or step == steps or (stop.requested and t.world_size == 1):
            # (stop asked, loss not finite) on the device; summed over the ranks, then read with the running
            # loss in one host sync
            state = t.loss_state
            flags = torch.stack([torch.full_like(state[0], float(stop.requested)),
                                 (~torch.isfinite(state[0])).to(state.dtype)])
            if t.world_size > 1:
                dist.all_reduce(flags)
            stop_asked, not_finite, running = torch.cat([flags, (state[0] / state[1]).reshape(1)]).tolist()
            if not_finite > 0:
                raise TrainingError(f"loss is not finite at epoch {epoch + 1} step {step}: stopping; "
                                    f"{t.last_path or 'last.pt'} keeps the last good state")
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            if log_step is not None:
                log_step(step, running, lr)
            if stop_asked > 0:
                bar.close()
                return step, True
    bar.close()
    return step, False


def _seconds_per_image(model, args, dtype, criterion, height, width, n_classes=4):
    """Seconds a training step takes per image at (height, width), on a throwaway copy of ``model``: the median
    of three steps after two that pay for one-off allocations (the heap grows to a step's peak)."""
    model = copy.deepcopy(model)
    optimizer = build_optimizer(model, args.lr, args.l2)
    x = torch.rand(args.batch_size, 3, height, width)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # every class present, as in the drinks images: the Lovasz and Dice losses cost more per class present
    y = torch.randint(0, n_classes, (args.batch_size, height, width), generator=torch.Generator().manual_seed(0))
    scaler = make_grad_scaler(torch.device("cpu"), dtype)
    ema = ModelEMA(model, args.ema) if args.ema else None

    def step():
        train_step(model, criterion, optimizer, scaler, x, y, dtype)
        if ema is not None:
            ema.update(model)  # as the run does after every step

    return timed(step, 3, 2, torch.device("cpu"), median=True) / args.batch_size


def estimate_cpu_run(model, args, dtype, n_train, n_val, criterion=F.cross_entropy, n_test=0, elapsed=0.0,
                     n_classes=4, first_epoch=0):
    """(minutes, epoch_seconds) the rest of the run should take on this CPU. The minutes: ``elapsed`` seconds
    already spent starting up, then the epochs from ``first_epoch`` (0-based; a resumed run's) on, from timed
    training steps of ``criterion`` at each input size they train at (see --progressive), with their
    validations, and the final scoring of ``n_test`` test images. ``epoch_seconds``: {(height, width): seconds
    of one epoch at that size, its validation included}, for each size left."""
    final = (args.height, args.width)
    sizes = epoch_sizes(getattr(args, "progressive", []), first_epoch, args.epochs, final)
    per_image = {size: _seconds_per_image(model, args, dtype, criterion, *size, n_classes)
                 for size in sorted(set(sizes))}
    # evaluation, at the final size, is a forward pass (about a third of a training step) plus native-size
    # scoring, per TTA view
    val_tta = getattr(args, "val_tta", None) or args.tta
    val = per_image[final] if final in per_image else _seconds_per_image(model, args, dtype, criterion, *final,
                                                                         n_classes)
    epoch_seconds = {size: per_image[size] * n_train + val * n_val / 2 * tta_cost(val_tta) for size in per_image}
    seconds = sum(epoch_seconds[size] for size in sizes)
    return (elapsed + seconds + val * n_test / 2 * tta_cost(args.tta)) / 60, epoch_seconds


def check_weights_agree(model, is_main=True):
    """Distributed: TrainingError unless every rank holds the same weights (each parameter's float64 sum and sum
    of squares, gathered from every rank and compared exactly); says so on the main rank. Single process: no-op.

    DDP keeps them equal by averaging the gradients; nodes whose data or code differ would drift apart."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    params = [p.detach().double() for p in model.parameters()]
    local = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in params])  # (P, 2)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    differ = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differ:
        raise TrainingError(f"the weights of ranks {differ} differ from rank 0's at the end of training")
    if is_main:
        print(f"the {len(gathered)} processes end with the same weights")
