"""seglib/engine.py: the book's step schedule, the scaled, cosine and poly schedules with warmup, and the rate
reaching the optimizer."""
import pytest
import torch

from seglib import engine


def test_books_schedule_values():
    expected = {0: 1e-3, 40: 1e-3, 41: 5e-4, 60: 5e-4, 61: 1e-4, 80: 1e-4, 81: 5e-5, 99: 5e-5}
    for epoch, lr in expected.items():
        assert engine.lr_scheduler(epoch) == pytest.approx(lr)
    assert engine.lr_scheduler(70, base_lr=2e-3) == pytest.approx(2e-4)
    scaled = [engine.lr_scheduler(e, epochs=10) for e in range(10)]
    assert scaled == pytest.approx([1e-3] * 5 + [5e-4] * 2 + [1e-4] * 2 + [5e-5])


def test_step_schedules_values():
    """100 steps per epoch, 10 epochs: book and scaled by epoch, cosine and poly by step, warmup in front."""
    def lr(schedule, step, warmup=0.0):
        return engine.learning_rate(schedule, step, 100, 10, base_lr=1e-3, warmup_epochs=warmup)

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
        engine.set_lr(opt, engine.lr_scheduler(epoch))
        w.sum().backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == engine.lr_scheduler(epoch)
        assert (1 - w.detach()).mean().item() == pytest.approx(engine.lr_scheduler(epoch), rel=1e-3)
