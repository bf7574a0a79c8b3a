"""Weight averaging for the training loop: an exponential moving average of the weights (Polyak &
Juditsky 1992; "ema") and lookahead (Zhang et al. 2019, in the form airbench uses: every k steps
the slow weights move toward the fast ones and the fast ones are reset to them; "lookahead").

Both keep ``avg = decay * avg + (1 - decay) * w`` over every floating-point entry of the model's
state dict (parameters and BatchNorm running statistics); integer buffers such as BatchNorm's
``num_batches_tracked`` are copied. The average starts as a copy of the weights at the first step
of ``start_epoch`` and is updated every ``every`` steps after that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class WeightAverage:
    """The averaged copy of a model's weights (``mode`` "ema" or "lookahead")."""

    def __init__(self, mode: str, decay: float, every: int, start_epoch: int) -> None:
        if mode not in ("ema", "lookahead"):
            raise ValueError(f"averaging mode must be 'ema' or 'lookahead', got {mode!r}")
        self.mode, self.decay, self.every, self.start_epoch = mode, decay, every, start_epoch
        self.state: dict[str, Tensor] | None = None
        self.steps = 0  # steps since the average started

    @torch.no_grad()
    def after_step(self, model: nn.Module, epoch: int) -> None:
        """Call after each optimizer step of ``epoch`` (0-based)."""
        if epoch + 1 < self.start_epoch:
            return
        weights = model.state_dict()
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in weights.items()}
            return
        self.steps += 1
        if self.steps % self.every:
            return
        for name, avg in self.state.items():
            w = weights[name]
            if avg.is_floating_point():
                avg.lerp_(w, 1.0 - self.decay)
                if self.mode == "lookahead":
                    w.copy_(avg)
            else:
                avg.copy_(w)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside the block ``model`` holds the averaged weights (unchanged before the start)."""
        if self.state is None:
            yield
            return
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(saved)

    def averaged_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights validation and best.pt use: the average once it started, else the model's."""
        return self.state if self.state is not None else model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "state": None if self.state is None else
                {k: v.detach().cpu() for k, v in self.state.items()}}

    def load_state_dict(self, saved: Mapping[str, Any], device: torch.device) -> None:
        self.steps = int(saved["steps"])
        state = saved["state"]
        self.state = None if state is None else {k: v.to(device) for k, v in state.items()}
