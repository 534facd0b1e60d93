"""Learning-rate schedules: the book's step schedule, the same scaled to the run, cosine and poly, each with an
optional linear warmup.

Every rate is a pure function of the global optimizer step (and the run's length), and train.py sets it before
each step. A resumed run restores epoch and step, so it sets exactly the rates an uninterrupted run sets.
"""
import math

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
