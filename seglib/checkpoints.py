"""A training run's saved state: what a checkpoint holds, the flags a resumed run must keep, and the writer that
saves checkpoints (and redraws the curves) in a background thread so that the device does not wait for the disk.
"""
import json
import os
import threading
from pathlib import Path

import torch

from model_utils import rng_state, save_checkpoint
from seglib.errors import CheckpointError, UsageError
from seglib.files import read_jsonl
from seglib.registry import SAME_PADDING, model_options

# flags a resumed run must keep (the model's are checked with the model): they change the data, the split or the
# steps; --epochs may change
RESUME_FIXED = ("height", "width", "batch_size", "data_path", "val_fraction", "seed", "split_seed", "limit")


def checkpoint_state(model, optimizer, scaler, args, class_names, epoch, step, best, loss_state, ema=None):
    """Everything ``--resume`` needs, as plain dicts and tensors (loadable with weights_only=True).

    ``epoch`` is the epoch in progress and ``step`` the steps done in it (0 when it has not started). With an
    EMA, its weights are saved too, and evaluation and export use them (seglib.registry.model_from_checkpoint).
    The tensors are the live ones: pass the state through ``host_copy`` before training goes on.
    """
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    return {
        **extra,
        "model": model.state_dict(),
        "config": {"n_classes": len(class_names), "model": args.model,
                   "model_options": model_options(args.model, args), "height": args.height, "width": args.width,
                   "class_names": list(class_names), "same_padding": SAME_PADDING},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_miou": best,
        "loss_state": loss_state.cpu(),
        "rng": rng_state(),
        "args": vars(args),
    }


def host_copy(state):
    """``state`` with every tensor copied to host memory (CPU tensors cloned): a snapshot that training, which
    updates the weights and optimizer moments in place, cannot change while it is written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


class BackgroundWriter:
    """Runs file-writing jobs (checkpoints, figures) one at a time in a thread, so the training loop goes on.

    ``submit`` first waits for the job before it (so files are written in order and at most one snapshot is held
    in memory), then starts the new one. A job's error is raised by the next ``submit`` or ``wait``. Use it as a
    context manager: leaving waits for the last job. ``threaded=False`` runs the jobs at once instead: on a
    CPU the training's threads already use every core, and a job beside them slows them by more than it takes.
    Each checkpoint is still written to a temporary name and renamed (model_utils.save_checkpoint), so a kill
    at any moment leaves the previous file or the new one.
    """

    def __init__(self, threaded=True):
        self.threaded = threaded
        self._thread, self._error = None, None

    def _run(self, jobs):
        try:
            for job in jobs:
                job()
        except Exception as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._error = e

    def submit(self, *jobs):
        """Wait for the previous jobs, then run ``jobs`` (callables) in order in the background (without
        ``threaded``: here and now)."""
        self.wait()
        if not self.threaded:
            for job in jobs:
                job()
            return
        self._thread = threading.Thread(target=self._run, args=(jobs,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self):
        """Block until the running jobs are done; re-raise the error of one that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.wait()  # the last job's error, if any, is the run's
        elif self._thread is not None:
            self._thread.join()
            self._thread = None
        return False


RESUME_ONLY = ("optimizer", "scaler", "loss_state", "rng")  # what last.pt holds for --resume and best.pt need not


def scoring_state(state):
    """``state`` without what only ``--resume`` needs: the weights (and EMA), config, epoch, score and flags that
    evaluation and export read, a third of the full state's size (Adam keeps two moments per weight)."""
    return {k: v for k, v in state.items() if k not in RESUME_ONLY}


def save_job(state, best_path=None, last_path=None):
    """A job that saves the host snapshot ``state`` atomically: in full to ``last_path`` and without the resume
    state to ``best_path`` (either None: not this epoch)."""
    def job():
        if best_path is not None:
            save_checkpoint(scoring_state(state), best_path)
        if last_path is not None:
            save_checkpoint(state, last_path)
    return job


def trim_metrics(path, epochs_done):
    """Keep only the metrics lines of epochs already in the checkpoint (a crash may have left one more)."""
    if not path.is_file():
        return
    rows, _ = read_jsonl(path)  # a torn last line (a run killed while writing it) goes too
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= epochs_done))
    os.replace(tmp, path)


def check_resume(args, ckpt, path):
    """UsageError if this run's flags would change the run ``path`` holds (see RESUME_FIXED)."""
    saved = ckpt.get("args", {})
    for key in RESUME_FIXED:
        if key not in saved:
            continue
        old, new = saved[key], getattr(args, key)
        if key == "data_path":
            old, new = str(Path(old).resolve()), str(Path(new).resolve())
        if old != new:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {getattr(args, key)}: {path} was trained with {flag} {saved[key]}; resume "
                             f"with the same value (only --epochs may change)")


def load_resumed_weights(model, state, path):
    """Load a resumed run's weights into ``model``; CheckpointError, naming ``path``, when they do not fit it."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in reason[1:3]) or (reason[0] if reason else type(e).__name__)
        raise CheckpointError(f"{path}: its weights do not fit this run's model ({detail})") from None
