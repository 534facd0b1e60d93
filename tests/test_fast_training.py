"""The GPU speed levers, checked on the CPU: data on the device (exact resume, kill -9 included), the compiled
training step (against eager, one graph per input size), and checkpoints written in the background."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn import functional as F

import train
from model_utils import make_grad_scaler
from seglib import checkpoints
from seglib.checkpoints import BackgroundWriter, host_copy, load_checkpoint
from seglib.engine import LossFunction, build_optimizer, train_step
from seglib.registry import build_model

ROOT = train.Path(train.__file__).parent
COMMON = ["--height", 40, "--width", 48, "--limit", 24, "--val-fraction", 0.005, "--deterministic", "--no-test",
          "--batch-size", 4, "--device", "cpu", "--workers", 0]


def _argv(tmp_path, drinks, *extra):
    return ["--data-path", str(drinks), "--output-dir", str(tmp_path / "weights"), "--figures-dir",
            str(tmp_path / "figures"), "--run-name", "run"] + [str(e) for e in [*COMMON, *extra]]


def _run(tmp_path, drinks, *extra):
    return train.main(train.get_args_parser().parse_args(_argv(tmp_path, drinks, *extra)))


def _same_weights(a, b):
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_on_device_resumes_bit_exactly_after_ctrl_c(tmp_path, drinks, monkeypatch, ctrl_c_at_step):
    levers = ["--data-on-device", "--progressive", "32x40:0.5", "--flips", "alternate"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    _run(full, drinks, *levers, "--epochs", 2)
    assert json.loads((full / "weights" / "run" / "config.json").read_text())["data_on_device"] is True
    monkeypatch.setattr(train, "build_criterion", lambda *a: ctrl_c_at_step(9))  # epoch 2, step 3 of 6
    assert _run(stopped, drinks, *levers, "--epochs", 2) is None
    assert load_checkpoint(stopped / "weights" / "run" / "last.pt")["step"] == 3
    monkeypatch.undo()
    _run(stopped, drinks, *levers, "--epochs", 2, "--resume")
    assert _same_weights(full / "weights" / "run" / "last.pt", stopped / "weights" / "run" / "last.pt")


def test_kill_9_at_any_moment_resumes_bit_exactly(tmp_path, drinks):
    """A run killed with SIGKILL (during an epoch or while its checkpoint is being written) and resumed ends with
    the weights of a run never interrupted."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    levers = ["--data-on-device", "--save-in-background", "--epochs", 2]
    _run(full, drinks, *levers)
    metrics = killed / "weights" / "run" / "metrics.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *_argv(killed, drinks, *levers)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, "the run wrote no metrics in 2 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # right after epoch 1's metrics: as its checkpoint is being written
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    _run(killed, drinks, *levers, "--resume")
    assert _same_weights(full / "weights" / "run" / "last.pt", killed / "weights" / "run" / "last.pt")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # nothing duplicated by the restart


def test_save_every_writes_last_pt_every_n_epochs_and_at_the_end(tmp_path, drinks, monkeypatch):
    saved = []
    real = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint",
                        lambda state, path: (saved.append((path.name, state["epoch"])), real(state, path)))
    _run(tmp_path, drinks, "--epochs", 3, "--save-every", 2, "--save-in-background")
    assert [e for name, e in saved if name == "last.pt"] == [2, 3]
    rows = [json.loads(line) for line in (tmp_path / "weights" / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val"]["miou_per_image"] for r in rows]
    improved = [i + 1 for i, s in enumerate(scores) if s > max(scores[:i], default=-1.0)]
    assert [e for name, e in saved if name == "best.pt"] == improved
    assert (tmp_path / "figures" / "run" / "curves.png").is_file()


def test_background_writer_snapshots_writes_in_order_and_reports_errors(tmp_path):
    weights = torch.zeros(3)
    snapshot = host_copy({"w": weights, "nested": [weights], "n": 1})
    weights += 1  # training goes on changing the live tensor
    assert torch.equal(snapshot["w"], torch.zeros(3)) and torch.equal(snapshot["nested"][0], torch.zeros(3))
    order = []
    with BackgroundWriter() as writer:
        writer.submit(lambda: (time.sleep(0.2), order.append(1)))
        writer.submit(lambda: order.append(2))  # waits for the first job
    assert order == [1, 2]

    def broken():
        raise OSError(f"{tmp_path}/last.pt: No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with BackgroundWriter() as writer:
            writer.submit(broken)


def _small_model():
    torch.manual_seed(0)
    return build_model("fcn_resnet56v2", 4, depth=11).to(memory_format=torch.channels_last)


def test_compiled_step_matches_the_eager_step(tmp_path):
    eager = _small_model()
    compiled = copy.deepcopy(eager)
    counters.clear()
    loss_fn = LossFunction(compiled, F.cross_entropy, None, backend="aot_eager")
    optimizers = [build_optimizer(m, 1e-3, 1e-4) for m in (eager, compiled)]
    scaler = make_grad_scaler(torch.device("cpu"), None)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.rand(2, 3, 32, 48, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (2, 32, 48), generator=gen)
        a = train_step(eager, F.cross_entropy, optimizers[0], scaler, x, y, None)
        b = train_step(compiled, None, optimizers[1], scaler, x, y, None, loss_fn)
        if step == 0:  # the same weights: the loss and its gradients agree up to float rounding
            assert b.item() == pytest.approx(a.item(), rel=1e-5)
            # rounding in a deep backward pass scales with the largest gradients (a bias before a BatchNorm has
            # a zero gradient, made of rounding alone)
            scale = max(p.grad.abs().max().item() for p in eager.parameters())
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5 * scale), name
        else:  # Adam turns rounding-sized gradient differences into lr-sized steps (a tiny gradient's sign decides
            # its step), so the weights, and the losses after them, drift apart by an amount that depends on the
            # CPU's kernels (AMX rounds otherwise than AVX-512): only a loose check is meaningful here
            assert b.item() == pytest.approx(a.item(), rel=2e-2)
    assert counters["stats"]["unique_graphs"] == 1  # the step did run through a compiled graph


def test_compiled_run_compiles_once_per_progressive_size(tmp_path, drinks, capsys):
    counters.clear()
    # the eager backend: dynamo captures and guards the graphs as inductor would have them, without the compile
    _run(tmp_path, drinks, "--compile", "--compile-backend", "eager", "--progressive", "32x40:0.3",
         "--epochs", 3)
    assert counters["stats"]["unique_graphs"] == 2  # 32x40 for epoch 1, 40x48 for 2-3; none across epochs
    out = capsys.readouterr().out
    assert out.count("compiled the training step at 32x40 in") == 1
    assert out.count("compiled the training step at 40x48 in") == 1


def test_compile_cache_file_is_written_atomically_and_needs_a_recent_torch(tmp_path, monkeypatch):
    from seglib import engine
    from seglib.files import UsageError

    path = tmp_path / "cache" / "step.bin"
    assert engine.load_compile_cache(path) is False  # nothing there yet: compile afresh
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None), raising=False)
    assert engine.save_compile_cache(path) and path.read_bytes() == b"artifacts"
    assert not list(path.parent.glob(".*.tmp"))
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append, raising=False)
    assert engine.load_compile_cache(path) and loaded == [b"artifacts"]
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts")
    with pytest.raises(UsageError, match="--compile-cache .*needs torch 2.7"):
        engine.load_compile_cache(path)
