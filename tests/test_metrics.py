"""Metrics against a hand-computed example, the book's schedule reaching the optimizer, checkpoints."""
import subprocess
import sys

import pytest
import torch

import model_utils as mu
import schedules as sch
from fcn import build_fcn
from model_utils import CheckpointError, SegmentationMetrics


def test_metrics_by_hand_with_absent_classes():
    # image 1: ground truth has classes 0 and 1 only; the prediction invents a 2
    gt1 = torch.tensor([[0, 0, 1], [0, 1, 1]])
    pr1 = torch.tensor([[0, 2, 1], [0, 1, 0]])
    # image 2: ground truth has classes 0 and 3; class 1 and 2 absent everywhere in it
    gt2 = torch.tensor([[3, 3, 0], [0, 0, 0]])
    pr2 = torch.tensor([[3, 0, 0], [0, 0, 0]])
    m = SegmentationMetrics(4)
    m.update(pr1, gt1)
    m.update(pr2, gt2)
    r = m.compute(["bg", "a", "b", "c"])
    # image 1: class 0: tp 2, union 4 -> 0.5; class 1: tp 2, union 3 -> 2/3 (class 2 is not in the ground truth)
    # image 2: class 0: tp 4, union 5 -> 0.8; class 3: tp 1, union 2 -> 0.5
    assert r["miou_per_image"] == pytest.approx(((0.5 + 2 / 3) / 2 + (0.8 + 0.5) / 2) / 2)
    assert r["pixel_accuracy_per_image"] == pytest.approx((4 / 6 + 5 / 6) / 2)
    # dataset: class 0: tp 6, gt 7, pred 8 -> 6/9; class 1: 2/3; class 2: tp 0, union 1 -> 0; class 3: 1/2
    assert [c["iou"] for c in r["per_class"]] == pytest.approx([6 / 9, 2 / 3, 0.0, 0.5])
    assert r["miou"] == pytest.approx((6 / 9 + 2 / 3 + 0 + 0.5) / 4)
    assert r["pixel_accuracy"] == pytest.approx(9 / 12)
    # class accuracy over classes in the ground truth: 6/7, 2/3, 1/2 (class 2 has none: None in JSON)
    assert r["mean_class_accuracy"] == pytest.approx((6 / 7 + 2 / 3 + 0.5) / 3)
    assert r["per_class"][2]["accuracy"] is None
    assert r["n_images"] == 2
    assert [c["share"] for c in r["per_class"]] == pytest.approx([7 / 12, 3 / 12, 0, 2 / 12])


def test_class_absent_from_ground_truth_and_prediction_is_left_out_of_miou():
    m = SegmentationMetrics(4)
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    r = m.compute()
    assert r["miou"] == 1.0 and r["miou_per_image"] == 1.0 and r["per_class"][3]["iou"] is None


def test_books_schedule_values():
    expected = {0: 1e-3, 40: 1e-3, 41: 5e-4, 60: 5e-4, 61: 1e-4, 80: 1e-4, 81: 5e-5, 99: 5e-5}
    for epoch, lr in expected.items():
        assert sch.lr_scheduler(epoch) == pytest.approx(lr)
    assert sch.lr_scheduler(70, base_lr=2e-3) == pytest.approx(2e-4)
    scaled = [sch.lr_scheduler(e, epochs=10) for e in range(10)]
    assert scaled == pytest.approx([1e-3] * 5 + [5e-4] * 2 + [1e-4] * 2 + [5e-5])


def test_step_schedules_values():
    """100 steps per epoch, 10 epochs: book and scaled by epoch, cosine and poly by step, warmup in front."""
    def lr(schedule, step, warmup=0.0):
        return sch.learning_rate(schedule, step, 100, 10, base_lr=1e-3, warmup_epochs=warmup)

    assert [lr("book", s) for s in (0, 999)] == [1e-3, 1e-3]  # the book's steps come at epoch 40
    assert [lr("scaled", s) for s in (499, 500, 700, 999)] == pytest.approx([1e-3, 5e-4, 1e-4, 5e-5])
    cosine = [1e-3, 8.5355e-4, 5e-4, 1.4645e-4, 0]
    assert [lr("cosine", s) for s in (0, 250, 500, 750, 1000)] == pytest.approx(cosine, abs=1e-8)
    assert [lr("poly", s) for s in (0, 500, 900)] == pytest.approx([1e-3, 1e-3 * 0.5 ** 0.9, 1e-3 * 0.1 ** 0.9])
    # one warmup epoch: linear up to the base over 100 steps, then the cosine over the remaining 900
    assert [lr("cosine", s, 1) for s in (0, 49, 99)] == pytest.approx([1e-5, 5e-4, 1e-3])
    assert lr("cosine", 550, 1) == pytest.approx(5e-4)
    assert lr("poly", 1000, 1) == 0 and lr("scaled", 9, 0.5) == pytest.approx(2e-4)  # 10 of 50 warmup steps
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr("linear", 0)


def test_schedule_reaches_the_optimizer():
    """Adam's first step moves each weight by about lr: the rate the schedule gives, not its square."""
    for epoch in (0, 50, 90):
        w = torch.nn.Parameter(torch.ones(10))
        opt = torch.optim.Adam([w], lr=123.0)
        sch.set_lr(opt, sch.lr_scheduler(epoch))
        w.sum().backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == sch.lr_scheduler(epoch)
        assert (1 - w.detach()).mean().item() == pytest.approx(sch.lr_scheduler(epoch), rel=1e-3)


def _state(n_layers=1):
    model = build_fcn(depth=11, n_layers=n_layers)
    cfg = {"n_classes": 4, "depth": 11, "n_layers": n_layers, "height": 32, "width": 40,
           "class_names": ["background", "Water", "Soda", "Juice"]}
    return model, {"model": model.state_dict(), "config": cfg}


def test_checkpoint_round_trip(tmp_path):
    model, state = _state()
    mu.save_checkpoint(state, tmp_path / "c.pt")
    assert not list(tmp_path.glob(".*tmp"))
    ckpt = mu.load_checkpoint(tmp_path / "c.pt")
    loaded = mu.model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


class Payload:
    """Stands for an arbitrary pickled object."""


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        mu.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pt: not a readable checkpoint"):
        mu.load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"model": {}, "config": Payload()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="pickle.pt: not a readable checkpoint"):
        mu.load_checkpoint(tmp_path / "pickle.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a checkpoint of this project"):
        mu.load_checkpoint(tmp_path / "other.pt")
    _, state = _state(n_layers=1)
    state["config"]["n_layers"] = 3
    mu.save_checkpoint(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit"):
        mu.model_from_checkpoint(mu.load_checkpoint(tmp_path / "mismatch.pt"), tmp_path / "mismatch.pt")


def test_evaluate_cli_on_a_bad_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "evaluate.py", "--weights", str(tmp_path / "bad.pt")],
                         capture_output=True, text=True, cwd=mu.Path(mu.__file__).parent)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "bad.pt: not a readable checkpoint" in out.stderr


def test_rng_state_round_trip():
    state = mu.rng_state()
    a = (torch.rand(3), mu.np.random.rand(3), mu.random.random())
    mu.set_rng_state(state)
    b = (torch.rand(3), mu.np.random.rand(3), mu.random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_amp_choice():
    cpu = torch.device("cpu")
    assert mu.amp_dtype(cpu, enabled=False) is None
    assert mu.amp_dtype(cpu) == (torch.bfloat16 if mu.cpu_has_bf16() else None)
    assert not mu.make_grad_scaler(cpu, torch.bfloat16).is_enabled()


def test_confusion_matrix_counts_every_pixel_pair():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 4, (37, 41), generator=g), torch.randint(0, 4, (37, 41), generator=g)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        expected[t, p] += 1
    got = mu.confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 4)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


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


def test_rng_state_restores_from_a_checkpoint_of_several_gpus():
    """An older last.pt holds one CUDA state per GPU it saw; the CPU states restore and the list is accepted."""
    state = mu.rng_state()
    a = torch.rand(3)
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 4 if not torch.cuda.is_available() else \
        [torch.cuda.get_rng_state()] * 4
    mu.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_workers_are_shared_among_the_processes_of_a_machine(monkeypatch):
    monkeypatch.setattr(mu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert mu.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert mu.default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert mu.default_workers() == 1
