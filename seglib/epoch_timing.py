"""End-to-end epoch time: train.py itself run for a few epochs (data, steps, validation, checkpoints, curves),
timed from the wall-clock stamps of its metrics.jsonl, so the figure is what a user's run gets."""
import gc
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seglib.errors import TrainingError


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
