"""A tiny synthetic problem for tests/moe_apps/test_training.py, also run as a script by the
SIGKILL-resume tests: ``python training_problem.py RUN_DIR KILL_AT_STEP [VARIANT]`` (trains inside
`start_run`, so the run folder's lock is held when the kill comes).

A 2-expert soft-gated regression net with dropout (so RNG state matters), its own aux losses and
routing stats (like a moe_core MoE layer), per-epoch shuffled batches from (seed, epoch).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from moe_apps.training import TrainConfig, fit
from moe_core.diagnostics import RoutingStats

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[2]  # the repository (PYTHONPATH and cwd of the SIGKILL subprocesses)
D_IN, NUM_EXAMPLES, BATCH = 4, 48, 8
APP, MODEL_CONFIG = "synthetic", {"d_in": D_IN, "num_experts": 2, "hidden": 16}


@dataclass
class Batch:
    x_BD: Tensor
    y_B: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.x_BD.to(device), self.y_B.to(device))


class TinyMoE(nn.Module):
    """y = sum_e gate_e(x) * expert_e(x); keeps last_aux_losses / last_stats like moe_core layers."""

    def __init__(self, d_in: int = D_IN, hidden: int = 16, num_experts: int = 2, dropout: float = 0.1):
        super().__init__()
        self.gate = nn.Linear(d_in, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
            for _ in range(num_experts)
        )
        self.last_aux_losses: dict[str, Tensor] | None = None
        self.last_stats: RoutingStats | None = None

    def forward(self, x_BD: Tensor) -> Tensor:
        logits_BE = self.gate(x_BD).float()
        probs_BE = logits_BE.softmax(-1)
        y_BE = torch.cat([expert(x_BD) for expert in self.experts], dim=-1)
        num_experts = probs_BE.shape[-1]
        self.last_aux_losses = {
            "load_balance": num_experts * probs_BE.mean(0).pow(2).sum(),
            "z_loss": torch.logsumexp(logits_BE, -1).pow(2).mean(),
        }
        counts_E = torch.bincount(probs_BE.argmax(-1).cpu(), minlength=num_experts)
        fraction_E = counts_E.double() / counts_E.sum()
        self.last_stats = RoutingStats(
            tokens_per_expert_E=counts_E, fraction_per_expert_E=fraction_E, dropped_fraction=0.0,
            entropy=float(-(probs_BE * probs_BE.clamp_min(1e-9).log()).sum(-1).mean().detach()),
            load_cv=float(counts_E.double().std(unbiased=False) / counts_E.double().mean()),
            dead_experts=int((counts_E == 0).sum()),
        )
        return (probs_BE.to(y_BE.dtype) * y_BE).sum(-1)


def make_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_EXAMPLES + 16, D_IN, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.05 * torch.randn(len(x), generator=g)
    return x[:NUM_EXAMPLES], y[:NUM_EXAMPLES], x[NUM_EXAMPLES:], y[NUM_EXAMPLES:]


def batch_fns(seed: int = 0):
    """train_batches(epoch) shuffled from (seed, epoch) only, and val_batches()."""
    x, y, vx, vy = make_data(seed)

    def train_batches(epoch: int) -> list[Batch]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        return [Batch(x[order[i:i + BATCH]], y[order[i:i + BATCH]]) for i in range(0, len(x), BATCH)]

    def val_batches() -> list[Batch]:
        return [Batch(vx[i:i + BATCH], vy[i:i + BATCH]) for i in range(0, len(vx), BATCH)]

    return train_batches, val_batches


class RegressionTask:
    """MSE; ``kill_at_step`` SIGKILLs the process when training step kill_at_step + 1 starts, and
    ``crash_at_step`` / ``crash_at_eval`` raise instead (an in-process crash)."""

    def __init__(self, kill_at_step: int | None = None, crash_at_step: int | None = None,
                 crash_at_eval: int | None = None) -> None:
        self.kill_at_step, self.crash_at_step, self.crash_at_eval = kill_at_step, crash_at_step, crash_at_eval
        self.steps = self.evals = 0
        self.output_dtypes: list[torch.dtype] = []

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        if self.kill_at_step is not None and self.steps == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.crash_at_step is not None and self.steps == self.crash_at_step:
            raise RuntimeError("simulated crash")
        self.steps += 1
        pred_B = model(batch.x_BD)
        self.output_dtypes.append(pred_B.dtype)
        loss = (pred_B.float() - batch.y_B).pow(2).mean()
        return loss, {"mse": float(loss.detach())}

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        self.evals += 1
        if self.crash_at_eval is not None and self.evals == self.crash_at_eval:
            raise RuntimeError("simulated crash in evaluate")
        total, count = 0.0, 0
        for batch in batches:
            total += float((model(batch.x_BD).float() - batch.y_B).pow(2).sum())
            count += len(batch.y_B)
        return {"loss": total / count, "neg_loss": -total / count}


def resume_config(**overrides) -> TrainConfig:
    base = dict(epochs=3, lr=3e-2, optimizer="adamw", weight_decay=0.01, schedule="cosine",
                warmup_steps=2, grad_clip=0.5, checkpoint_every=1, patience=None, progress=False,
                aux_loss_coefficients=(("load_balance", 0.1), ("z_loss", 0.01)), device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def gate_group(model: nn.Module) -> list[dict]:
    """The gate trains 4x faster without weight decay; the experts form the default group."""
    return [{"params": list(model.gate.parameters()), "lr_scale": 4.0, "weight_decay": 0.0, "name": "gate"}]


#: the loop options the exact-resume tests cover: name -> (TrainConfig overrides, param_groups)
VARIANTS = {
    "plain": ({}, None),
    "sgd-triangular-lookahead": (dict(optimizer="sgd", momentum=0.85, nesterov=True, weight_decay=5e-4,
                                      schedule="triangular", peak_fraction=0.3, start_factor=0.2,
                                      warmup_steps=0, averaging="lookahead", averaging_decay=0.6,
                                      averaging_every=3, snapshots=2), gate_group),
    "adamw-inverse-sqrt-ema": (dict(betas=(0.9, 0.98), eps=1e-9, schedule="inverse_sqrt",
                                    warmup_steps=4, averaging="ema", averaging_decay=0.7,
                                    averaging_start_epoch=2, snapshots=3), gate_group),
}


def run(run_dir: Path, task: RegressionTask, *, resume: bool = False, model_seed: int = 0,
        config: TrainConfig | None = None, variant: str = "plain"):
    from moe_apps.training.run import start_run

    overrides, groups = VARIANTS[variant]
    torch.manual_seed(model_seed)
    model = TinyMoE()
    train_batches, val_batches = batch_fns()
    with start_run(run_dir, app=APP, config=MODEL_CONFIG, data_root=None, resume=resume) as info:
        result = fit(model, task, train_batches, val_batches, config or resume_config(**overrides),
                     info.run_dir, app=APP, model_config=MODEL_CONFIG, resume=resume, param_groups=groups)
    return model, result



@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise-reproducible CPU math: one thread, as in the SIGKILL subprocess (a test module
    imports it to use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


if __name__ == "__main__":
    torch.set_num_threads(1)
    variant = sys.argv[3] if len(sys.argv) > 3 else "plain"
    run(Path(sys.argv[1]), RegressionTask(kill_at_step=int(sys.argv[2])), variant=variant)
