"""A tiny expert-parallel problem for the training loop under torchrun (tests/moe_apps/
test_distributed_loop.py and test_distributed_launch.py): ``head(h + moe(h))``, ``h = tanh(inp(x))``
with a moe_core top-2-of-4 layer (dropless, load-balance and z-loss), no dropout, no batch statistics,
Adam with warm-up + cosine, gradient clipping and an EMA of the weights.

Under N processes the app's batches are ``BATCH`` examples and rank r trains on batches r, r+N, ...;
the one-process reference gets the same global batch: N consecutive batches concatenated
(``train_batches(merge=N)``). Also a script, run by torch's launcher in the kill test:
``python distributed_problem.py RUN_DIR [--resume] [--kill-rank R --kill-at STEP]``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from training_problem import Batch  # this folder is on sys.path (under pytest, and as a script)

from moe_apps.training import TrainConfig, fit
from moe_apps.training.run import start_run
from moe_core import ExpertBank, MoE, TopKRouter

D, H, E, NUM_EXAMPLES, BATCH = 6, 10, 4, 48, 8
APP, MODEL_CONFIG = "ep-synthetic", {"d": D, "hidden": H, "experts": E}
STEPS_PER_EPOCH = NUM_EXAMPLES // (2 * BATCH)  # at 2 processes (and in one with merge=2)


class TinyEP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H, bias=True), capacity_factor=None)
        self.head = nn.Linear(D, 1)

    def forward(self, x_BD: Tensor) -> Tensor:
        h_BD = torch.tanh(self.inp(x_BD))
        return self.head(h_BD + self.moe(h_BD).output).squeeze(-1)


def build(world: int) -> nn.Module:
    """The model with seed 0; its MoE layer split over the ``world`` ranks when world > 1."""
    torch.manual_seed(0)
    model = TinyEP()
    if world > 1:
        from moe_apps.training.distributed import current_context
        from moe_core import to_expert_parallel

        current_context()
        to_expert_parallel(model)
    return model


def _data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_EXAMPLES + 16, D, generator=g)
    y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 0.05 * torch.randn(len(x), generator=g)
    return x[:NUM_EXAMPLES], y[:NUM_EXAMPLES], x[NUM_EXAMPLES:], y[NUM_EXAMPLES:]


def train_batches(epoch: int, merge: int = 1) -> list[Batch]:
    """The epoch's batches of BATCH (shuffled from the epoch); ``merge`` consecutive ones joined."""
    x, y, _, _ = _data()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + epoch))
    size = BATCH * merge
    return [Batch(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x) - size + 1, size)]


def val_batches() -> list[Batch]:
    _, _, vx, vy = _data()
    return [Batch(vx, vy)]


def probe() -> Tensor:
    return torch.linspace(-2, 2, 5 * D).reshape(5, D)


class Task:
    """MSE; ``losses`` holds this process's task loss of every step; ``crash_at`` raises when that
    step (from 1) starts; ``kill_at`` SIGKILLs rank ``kill_rank`` there (mid-run: the rank dies)."""

    def __init__(self, crash_at: int | None = None, kill_at: int | None = None, kill_rank: int = 1,
                 start: int = 0) -> None:
        self.crash_at, self.kill_at, self.kill_rank = crash_at, kill_at, kill_rank
        self.step, self.losses = start, []

    def training_loss(self, model: nn.Module, batch: Batch):
        self.step += 1
        if self.crash_at == self.step:
            raise RuntimeError("simulated crash")
        if self.kill_at == self.step and int(os.environ.get("RANK", "0")) == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = (model(batch.x_BD) - batch.y_B).pow(2).mean()
        self.losses.append(float(loss.detach()))
        return loss, {}

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        batches = list(batches)
        total = sum(float((model(b.x_BD) - b.y_B).pow(2).sum()) for b in batches)
        return {"loss": total / sum(len(b.y_B) for b in batches)}


def config(epochs: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=2e-2, optimizer="adam", schedule="cosine", warmup_steps=2,
                       grad_clip=0.3, checkpoint_every=1, patience=None, progress=False, device="cpu",
                       averaging="ema", averaging_decay=0.8, averaging_start_epoch=2,
                       aux_loss_coefficients=(("load_balance", 0.01), ("z_loss", 0.001)))


def train(run_dir: Path, world: int, task: Task, *, resume: bool = False, merge: int = 1) -> nn.Module:
    """Train (or resume) in ``run_dir`` inside `start_run`, like an app does; returns the model."""
    model = build(world)
    with start_run(run_dir, app=APP, config=MODEL_CONFIG, data_root=None, resume=resume) as info:
        fit(model, task, lambda epoch: train_batches(epoch, merge), val_batches, config(), info.run_dir,
            app=APP, model_config=MODEL_CONFIG, resume=resume)
    return model


# ----- N local processes with torchrun's environment (torch.multiprocessing) ---------------------
def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` processes that see torchrun's variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); raises if one fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    kill = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else None
    rank_to_kill = int(argv[argv.index("--kill-rank") + 1]) if "--kill-rank" in argv else 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    train(Path(argv[0]), world_size, Task(kill_at=kill, kill_rank=rank_to_kill), resume="--resume" in argv)
