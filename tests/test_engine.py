"""seglib/engine.py: the book's optimizer, the training step and loop, and the CPU time estimate's arithmetic."""
import argparse
import sys

import pytest
import torch

from fcn import build_fcn
from seglib import engine


def test_the_books_optimizer():
    """Adam with Keras' defaults (eps 1e-7), the book's L2 of 1e-4 as coupled weight decay 2e-4 on exactly the
    backbone's conv kernels, no decay on anything else."""
    model = build_fcn(depth=11, n_layers=2)
    optimizer = engine.build_optimizer(model, 1e-3, 1e-4)
    assert isinstance(optimizer, torch.optim.Adam) and not optimizer.defaults.get("decoupled_weight_decay", False)
    decayed, plain = optimizer.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (2e-4, 0.0)
    assert all(g["eps"] == 1e-7 and g["betas"] == (0.9, 0.999) and g["lr"] == 1e-3 for g in (decayed, plain))
    kernels = {id(m.weight) for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {id(p) for p in decayed["params"]} == kernels
    assert not kernels & {id(p) for p in plain["params"]}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("tta, val_passes", [("none", 1), ("flip", 2), ("flip+scales", 2 * (1 + 1.25 ** 2 + 1.5 ** 2))])
def test_cpu_estimate_adds_up_start_up_training_validation_and_test(monkeypatch, tta, val_passes):
    """Each timed step takes 2 s of a fake clock: 0.5 s an image at batch 4. An epoch is 100 training images and
    10 validation images, each of those costing half a training image (a forward pass and native-size scoring),
    twice with flip TTA; the 20 test images cost as much each, and 30 s of start-up have passed."""
    clock = iter(range(0, 1000, 2))
    monkeypatch.setattr(engine.time, "perf_counter", lambda: float(next(clock)))
    args = argparse.Namespace(lr=1e-3, l2=1e-4, batch_size=4, height=32, width=40, channels_last=False, ema=0.0,
                              tta=tta, epochs=3)
    minutes, epoch_seconds = engine.estimate_cpu_run(build_fcn(depth=11, n_layers=1), args, None, n_train=100,
                                                     n_val=10, n_test=20, elapsed=30.0)
    assert minutes == pytest.approx((30 + 0.5 * (100 + 10 / 2 * val_passes) * 3 + 0.5 * 20 / 2 * val_passes) / 60)
    assert epoch_seconds == {(32, 40): pytest.approx(0.5 * (100 + 10 / 2 * val_passes))}


def test_cpu_estimate_takes_the_median_step_with_every_class_present(monkeypatch):
    """Two steps are not timed, then the median of three: one slow step among them changes nothing. The steps'
    targets hold every class, as the Lovasz loss's cost grows with the classes present."""
    durations = iter([9.0, 9.0, 1.0, 5.0, 1.2])
    seen, now = [], [0.0]

    def perf_counter():
        return now[0]

    def timed_step(model, criterion, optimizer, scaler, x, y, dtype):  # moves the fake clock by its duration
        seen.append(torch.unique(y).tolist())
        now[0] += next(durations)
    monkeypatch.setattr(engine.time, "perf_counter", perf_counter)
    monkeypatch.setattr(engine, "train_step", timed_step)
    args = argparse.Namespace(lr=1e-3, l2=1e-4, batch_size=4, height=32, width=40, channels_last=False, ema=0.0)
    seconds = engine._seconds_per_image(build_fcn(depth=11, n_layers=1), args, None, None, 32, 40, n_classes=3)
    assert seconds == pytest.approx(1.2 / 4)
    assert seen == [[0, 1, 2]] * 5


def _progressive_run(monkeypatch):
    """A run of 4 epochs at 64x80 with --progressive 32x40:0.5 whose step takes height * width / 1000 s an image;
    returns its args and the list of sizes the estimate times."""
    timed = []

    def seconds_per_image(model, args, dtype, criterion, height, width, n_classes):
        timed.append((height, width))
        return height * width / 1000

    monkeypatch.setattr(engine, "_seconds_per_image", seconds_per_image)
    args = argparse.Namespace(lr=1e-3, l2=1e-4, batch_size=4, height=64, width=80, channels_last=False, ema=0.0,
                              tta="none", epochs=4, progressive=[[32, 40, 0.5]])
    return args, timed


def test_cpu_estimate_times_each_size_of_a_progressive_run(monkeypatch):
    """--progressive 32x40:0.5 over 4 epochs at 64x80: two epochs at each size, each timed at its own size;
    validation at the final size."""
    args, timed = _progressive_run(monkeypatch)
    minutes, epoch_seconds = engine.estimate_cpu_run(None, args, None, n_train=100, n_val=10)
    assert sorted(timed) == [(32, 40), (64, 80)]
    assert minutes == pytest.approx((2 * 1.28 * 100 + 2 * 5.12 * 100 + 4 * 5.12 * 10 / 2) / 60)
    # an epoch at either size is validated at the final size
    assert epoch_seconds == {(32, 40): pytest.approx(1.28 * 100 + 5.12 * 10 / 2),
                             (64, 80): pytest.approx(5.12 * 100 + 5.12 * 10 / 2)}


def test_cpu_estimate_of_a_resumed_run_counts_only_the_epochs_left(monkeypatch):
    """The same run resumed at its fourth epoch (first_epoch=3): one epoch at 64x80 is left, so the 32x40 size
    is not timed at all and neither the three epochs done nor their validations are counted."""
    args, timed = _progressive_run(monkeypatch)
    minutes, epoch_seconds = engine.estimate_cpu_run(None, args, None, n_train=100, n_val=10, first_epoch=3)
    assert timed == [(64, 80)]
    assert minutes == pytest.approx((5.12 * 100 + 5.12 * 10 / 2) / 60)
    assert list(epoch_seconds) == [(64, 80)]


def test_a_step_frees_the_last_gradients_before_its_forward_pass():
    """The previous step's gradients are gone when the next forward pass allocates its activations."""
    model = build_fcn(depth=11, n_layers=1)
    optimizer = engine.build_optimizer(model, 1e-3, 1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(sum(p.grad is not None for p in m.parameters())))
    x, y = torch.rand(1, 3, 32, 32), torch.randint(0, 4, (1, 32, 32))
    for _ in range(2):
        engine.train_step(model, torch.nn.functional.cross_entropy, optimizer, scaler, x, y, None)
    assert seen == [0, 0] and all(p.grad is not None for p in model.parameters())


def test_a_check_step_reads_the_device_once(monkeypatch):
    """Every CHECK_EVERY steps the loop checks the loss, reads it for the bar and looks for a stop request: one
    host sync (``tolist``), no ``item`` or truth test of a device tensor."""
    model = build_fcn(depth=11, n_layers=1)
    optimizer = engine.build_optimizer(model, 1e-3, 1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = [(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 4, (1, 32, 32)))] * 10
    reads = []  # the loop's own reads (the optimizer's CPU step counters are read with item() too)

    def counted(name, original):
        def read(tensor, *a):
            if sys._getframe(1).f_code.co_filename == engine.__file__:
                reads.append(name)
            return original(tensor, *a)
        return read
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    stop = engine.StopRequest()
    trainer = engine.Trainer(model, torch.nn.functional.cross_entropy, optimizer, scaler, torch.device("cpu"),
                             is_main=False)
    step, stopped = engine.train_one_epoch(trainer, loader, 0, 1, lambda s: 1e-3, stop)
    assert (step, stopped) == (10, False) and reads == ["tolist"]
