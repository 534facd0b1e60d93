"""model_utils.py: checkpoints written through a temporary name and read safely, RNG states, the amp choice,
GradScaler states across precisions, and loader workers."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_utils as mu
from fcn import build_fcn
from seglib.checkpoints import load_checkpoint, save_checkpoint
from seglib.files import CheckpointError
from seglib.registry import SAME_PADDING, model_from_checkpoint


def _state(n_layers=1):
    model = build_fcn(depth=11, n_layers=n_layers)
    cfg = {"n_classes": 4, "depth": 11, "n_layers": n_layers, "height": 32, "width": 40,
           "class_names": ["background", "Water", "Soda", "Juice"], "same_padding": SAME_PADDING}
    return model, {"model": model.state_dict(), "config": cfg}


def test_checkpoint_round_trip(tmp_path):
    model, state = _state()
    save_checkpoint(state, tmp_path / "c.pt")
    assert not list(tmp_path.glob(".*tmp"))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    loaded = model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


class Payload:
    """Stands for an arbitrary pickled object."""


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"model": {}, "config": Payload()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="pickle.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "pickle.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")
    _, state = _state(n_layers=1)
    state["config"]["n_layers"] = 3
    save_checkpoint(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit"):
        model_from_checkpoint(load_checkpoint(tmp_path / "mismatch.pt"), tmp_path / "mismatch.pt")


def test_evaluate_cli_on_a_bad_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "evaluate.py", "--weights", str(tmp_path / "bad.pt")],
                         capture_output=True, text=True, cwd=Path(mu.__file__).parent)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "bad.pt: not a readable checkpoint" in out.stderr


def test_rng_state_round_trip():
    state = mu.rng_state()
    a = (torch.rand(3), mu.np.random.rand(3), mu.random.random())
    mu.set_rng_state(state)
    b = (torch.rand(3), mu.np.random.rand(3), mu.random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def test_amp_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert mu.amp_dtype(cpu, enabled=False) is None
    flags = _cpu_flags()
    if flags is not None:  # bf16 autocast exactly where the CPU has bf16 matrix instructions
        assert (mu.amp_dtype(cpu) == torch.bfloat16) == bool({"avx512_bf16", "amx_bf16"} & flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert mu.amp_dtype(cpu) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert mu.amp_dtype(cpu) == torch.bfloat16
    assert not mu.make_grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert mu.make_grad_scaler(cpu, torch.float16).is_enabled()


def test_an_fp16_run_resumes_a_scaler_state_saved_disabled():
    """A bf16 or CPU run saves a disabled GradScaler's empty state; resumed where fp16 is used (a pre-Ampere GPU)
    the enabled scaler starts afresh instead of failing, and a real fp16 state is restored."""
    saved_disabled = mu.make_grad_scaler(torch.device("cpu"), torch.bfloat16).state_dict()
    assert saved_disabled == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    mu.restore_grad_scaler(scaler, saved_disabled)
    assert scaler.get_scale() == 65536.0
    mu.restore_grad_scaler(scaler, {**torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()})
    assert scaler.get_scale() == 1024.0


def test_rng_state_restores_from_a_checkpoint_of_several_gpus(monkeypatch):
    """An older last.pt holds one CUDA state per GPU it saw: the CPU states restore, and this process's GPU gets
    the first of the four (distinct) states. The CUDA calls are recorded, so the list path runs on a CPU too."""
    state = mu.rng_state()
    a = torch.rand(3)
    per_gpu = [torch.full((16,), gpu, dtype=torch.uint8) for gpu in range(4)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    mu.set_rng_state({**state, "cuda": per_gpu})
    assert torch.equal(torch.rand(3), a)
    assert len(restored) == 1 and torch.equal(restored[0], per_gpu[0])
    mu.set_rng_state({**state, "cuda": per_gpu[2]})  # a per-process checkpoint: its one state
    assert torch.equal(restored[1], per_gpu[2])


def test_workers_are_shared_among_the_processes_of_a_machine(monkeypatch):
    monkeypatch.setattr(mu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert mu.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert mu.default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert mu.default_workers() == 1


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    model, state = _state()
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    before = path.read_bytes()

    def torch_save_then_disk_full(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mu.torch, "save", torch_save_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {}, "config": {}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_malformed_checkpoint_entries_are_one_line_each(tmp_path):
    """A config that is a list, a model option that is a string, model options that are no dict: a clear
    CheckpointError naming the file. An ``ema`` entry without weights is no EMA: the trained weights load."""
    model, state = _state()
    cases = {"list": {**state, "config": [1, 2]},
             "string": {**state, "config": {**state["config"], "model": "fcn_resnet56v2",
                                            "model_options": {"depth": "11", "n_layers": 1}}},
             "options": {**state, "config": {**state["config"], "model": "fcn_resnet56v2", "model_options": "deep"}}}
    messages = {"list": "list.pt: its 'config' and 'model' entries are not dicts",
                "string": "string.pt: checkpoint config's model 'fcn_resnet56v2' or its options",
                "options": "options.pt: checkpoint config's model_options is not a dict"}
    for name, bad in cases.items():
        save_checkpoint(bad, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=messages[name]):
            model_from_checkpoint(load_checkpoint(tmp_path / f"{name}.pt"), tmp_path / f"{name}.pt")
    save_checkpoint({**state, "ema": {"decay": 0.99}}, tmp_path / "ema.pt")
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "ema.pt"), tmp_path / "ema.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
