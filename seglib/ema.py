"""Exponential moving average (EMA) of a model's weights, which train.py validates, keeps as best.pt and scores.

After every optimizer step, every floating-point entry of the EMA copy's state (parameters and BatchNorm
running statistics alike) moves towards the trained model's:

    ema = d * ema + (1 - d) * model,    d = min(decay, (1 + n) / (10 + n)) after n updates,

so the random initial weights fade within the first steps (the warmup of timm's ModelEmaV2). Averaging the
running statistics with the same weights as the parameters keeps them the statistics of the averaged model, not
of the last step's weights; integer buffers (BatchNorm's batch counter) are copied.
"""
import copy

import torch


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
