"""Launched by test_recsys_distributed under torchrun (2 processes): trains a small recsys run
whose early stopping follows the validation NDCG@10 while torchrec shards its tables (with the
EASE neighbourhood term on the logits, a dense parameter beside the sharded tables).

    python -m torch.distributed.run --standalone --nproc-per-node 2 ranking_monitor_worker.py DATA OUT
"""

from __future__ import annotations

import sys

from rich.console import Console

from moe_apps.recsys.config import LIKE, RATE, RATING, ModelConfig, RecsysConfig
from moe_apps.recsys.train import train

CONFIG = RecsysConfig(split="recbole", negatives=1, epochs=3, patience=None, batch_size=64,
                      monitor="ndcg@10", monitor_mode="max", device="cpu", model=ModelConfig(
                          model="mmoe", tasks=(RATE, LIKE, RATING), embedding_dim=4, num_experts=3,
                          expert_dim=5, tower_dim=3, neighbourhood=5.0))  # and the EASE term

if __name__ == "__main__":
    data_dir, out = sys.argv[1:3]
    train(CONFIG, out, data_dir=data_dir, console=Console(quiet=True), progress=False)
