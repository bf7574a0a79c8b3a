"""Multi-task recommenders for MovieLens, all built by one `build_model(config)`.

Every model shares the same front end, `FeatureEncoder`: a torchrec `EmbeddingBagCollection` with
one table per sparse feature (user, movie, gender, age, occupation, zip prefix, year bucket, genres
and the user's rated-movie history, the last two mean-pooled), plus the SVD++-style interaction
``(p_u + mean_{j in N(u)} y_j) * q_i`` (Koren 2008) and two dense count features, concatenated to
``x_BD``; and a second collection of per-task user and movie biases, to which, if
``neighbourhood > 0``, the pair's item-item score (`moe_apps.recsys.neighbourhood`) adds with a
learned weight per task (Koren's integrated model: the neighbourhood term beside the network's
prediction, not one more input of it). What differs is the bottom
between ``x_BD`` and the per-task towers:

* ``single``: one separate network per task (its own tables, MLP bottom and tower);
* ``shared-bottom``: one MLP shared by all tasks (Caruana 1997);
* ``mmoe``: `moe_core.multigate.MMoE` (Ma et al. 2018), one softmax gate per task;
* ``ple``: `moe_core.multigate.PLE` with two CGC levels (Tang et al. 2020).

The MLP bottoms are ``num_experts * expert_dim`` wide, so each bottom costs about the same as the
experts of MMoE / the first PLE level. Heads: a binary task outputs a logit, a regression task
``low + (high - low) * sigmoid(z)``; the per-task user and movie biases are added to ``z``.

Shape legend: B batch, D encoder width, H expert / bottom width, E experts, T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from moe_apps.recsys.config import ModelConfig, TaskSpec
from moe_apps.recsys.data import (
    ITEM_SIDE,
    SPARSE_FEATURES,
    USER_SIDE,
    CandidateBatch,
    RecsysBatch,
    stack_dense,
)
from moe_core.multigate import PLE, MMoE

MEAN_POOLED = ("genres", "history")
NUM_DENSE = 2
INIT_STD = 0.05


@dataclass(frozen=True)
class RecsysOutput:
    """What every recsys model returns for a batch.

    Attributes:
        logits_BT: raw head outputs ``z`` (bias included), one column per task.
        predictions_BT: probability (binary tasks) or value in [low, high] (regression tasks).
        gate_weights: per task ``(B, E_t)`` gate weights (MMoE / PLE), else None.
        embedding_sq: mean over the batch of the squared norms of the looked-up user, movie and
            history embeddings and biases (the L2 penalty the task weights).
    """

    logits_BT: Tensor
    predictions_BT: Tensor
    gate_weights: list[Tensor] | None
    embedding_sq: Tensor


class FeatureEncoder(nn.Module):
    """torchrec embeddings of a `RecsysBatch` -> ``x_BD``, per-task biases ``(B, T)`` and the L2 term."""

    def __init__(self, config: ModelConfig, num_tasks: int) -> None:
        super().__init__()
        d = config.embedding_dim
        init = partial(nn.init.normal_, std=INIT_STD)
        self.embeddings = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(
                name=f"t_{feature}", embedding_dim=d, num_embeddings=config.vocab_size(feature),
                feature_names=[feature], init_fn=init,
                pooling=PoolingType.MEAN if feature in MEAN_POOLED else PoolingType.SUM,
            )
            for feature in SPARSE_FEATURES
        ])
        self.biases = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"bias_{feature}", embedding_dim=num_tasks,
                               num_embeddings=config.vocab_size(feature), feature_names=[feature],
                               init_fn=nn.init.zeros_)
            for feature in ("user", "item")
        ])
        self.dropout = nn.Dropout(config.dropout)
        self.d_out = d * (len(SPARSE_FEATURES) + 1) + NUM_DENSE
        # Koren's integrated model: the neighbourhood score joins each task's logit with a learned
        # weight (zero at the start) instead of entering the bottom (recbole split, MMoE, validation
        # NDCG@10: 0.2537 this way, 0.2487 as one more bottom input)
        self.neighbourhood_weight = nn.Parameter(torch.zeros(num_tasks)) if config.neighbourhood else None

    def forward(self, batch: RecsysBatch | CandidateBatch) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(batch, CandidateBatch):
            user, item = self.side_tables(batch.user_sparse, batch.item_sparse)
            u_B, i_B = batch.pair_user_B, batch.pair_item_B
            pooled = {f: user[f][u_B] for f in USER_SIDE} | {f: item[f][i_B] for f in ITEM_SIDE}
            bias_BT = user["bias"][u_B] + item["bias"][i_B]
            dense_BF = stack_dense(batch.user_dense_U[u_B], batch.item_dense_I[i_B], batch.pair_dense_B)
        else:
            pooled = self.embeddings(batch.sparse).to_dict()
            biases = self.biases(batch.sparse).to_dict()
            bias_BT, dense_BF = biases["user"] + biases["item"], batch.dense_BF
        return self.combine(pooled, bias_BT, dense_BF)

    def side_tables(self, user_sparse: KeyedJaggedTensor,
                    item_sparse: KeyedJaggedTensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Pooled `USER_SIDE` embeddings and user biases per row of ``user_sparse`` (U rows), and
        the `ITEM_SIDE` ones of ``item_sparse`` (I rows); key ``bias`` holds the ``(rows, T)`` biases."""
        user = self.embeddings(user_sparse).to_dict()
        item = self.embeddings(item_sparse).to_dict()
        user = {f: user[f] for f in USER_SIDE} | {"bias": self.biases(user_sparse).to_dict()["user"]}
        item = {f: item[f] for f in ITEM_SIDE} | {"bias": self.biases(item_sparse).to_dict()["item"]}
        return user, item

    def combine(self, pooled: dict[str, Tensor], bias_BT: Tensor,
                dense_BF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(``x_BD``, ``bias_BT``, L2 term) from the pooled embeddings of every sparse feature."""
        user_BD, item_BD, history_BD = pooled["user"], pooled["item"], pooled["history"]
        interaction_BD = (user_BD + history_BD) * item_BD
        x_BD = torch.cat([*(pooled[f] for f in SPARSE_FEATURES), interaction_BD, dense_BF[:, :NUM_DENSE]], 1)
        sq = (user_BD.square().sum(1) + item_BD.square().sum(1) + history_BD.square().sum(1)
              + bias_BT.square().sum(1)).mean()
        if self.neighbourhood_weight is not None:
            bias_BT = bias_BT + dense_BF[:, NUM_DENSE:] * self.neighbourhood_weight
        return self.dropout(x_BD), bias_BT, sq


def _mlp(d_in: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout))


class Heads(nn.Module):
    """Per-task towers ``H -> tower_dim -> 1`` and the binary / regression output maps."""

    def __init__(self, tasks: tuple[TaskSpec, ...], d_in: int, tower_dim: int) -> None:
        super().__init__()
        self.tasks = tasks
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, tower_dim), nn.ReLU(), nn.Linear(tower_dim, 1))
            for _ in tasks
        )

    def forward(self, task_outputs: list[Tensor], bias_BT: Tensor) -> tuple[Tensor, Tensor]:
        logits = [tower(h).squeeze(-1) for tower, h in zip(self.towers, task_outputs, strict=True)]
        logits_BT = torch.stack(logits, 1) + bias_BT
        predictions = [
            torch.sigmoid(logits_BT[:, t]) if spec.kind == "binary"
            else spec.low + (spec.high - spec.low) * torch.sigmoid(logits_BT[:, t])
            for t, spec in enumerate(self.tasks)
        ]
        return logits_BT, torch.stack(predictions, 1)


class MultiTaskRecommender(nn.Module):
    """Encoder -> bottom ("shared-bottom" MLP, MMoE or PLE) -> per-task heads."""

    def __init__(self, config: ModelConfig, tasks: tuple[TaskSpec, ...], bottom: str) -> None:
        super().__init__()
        self.tasks, self.kind = tasks, bottom
        self.encoder = FeatureEncoder(config, len(tasks))
        d_in, h = self.encoder.d_out, config.expert_dim
        if bottom == "shared-bottom":
            self.bottom: nn.Module = _mlp(d_in, config.num_experts * h, config.dropout)
            d_head = config.num_experts * h
        elif bottom == "mmoe":
            self.bottom = MMoE.from_sizes(d_in, h, config.num_experts, len(tasks))
            d_head = h
        elif bottom == "ple":
            self.bottom = PLE(d_in, h, len(tasks), num_levels=config.ple_levels,
                              num_shared_experts=config.num_shared_experts,
                              num_task_experts=config.num_task_experts)
            d_head = h
        else:
            raise ValueError(f"bottom must be 'shared-bottom', 'mmoe' or 'ple', got {bottom!r}")
        self.expert_dropout = nn.Dropout(config.dropout)
        self.heads = Heads(tasks, d_head, config.tower_dim)

    def forward(self, batch: RecsysBatch | CandidateBatch) -> RecsysOutput:
        return self.from_encoded(*self.encoder(batch))

    def from_encoded(self, x_BD: Tensor, bias_BT: Tensor, sq: Tensor) -> RecsysOutput:
        """Bottom and heads on encoded features (the exported model enters here)."""
        gates = None
        if self.kind == "shared-bottom":
            outputs = [self.bottom(x_BD)] * len(self.tasks)
        else:
            multi = self.bottom(x_BD)
            outputs = [self.expert_dropout(o) for o in multi.task_outputs]
            gates = multi.gate_weights
        logits_BT, predictions_BT = self.heads(outputs, bias_BT)
        return RecsysOutput(logits_BT, predictions_BT, gates, sq)


class SingleTaskModels(nn.Module):
    """One independent shared-bottom network per task (no parameter is shared between tasks)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tasks = config.tasks
        self.nets = nn.ModuleList(
            MultiTaskRecommender(config, (task,), "shared-bottom") for task in config.tasks
        )

    def forward(self, batch: RecsysBatch | CandidateBatch) -> RecsysOutput:
        return self.merge([net(batch) for net in self.nets])

    @staticmethod
    def merge(outs: list[RecsysOutput]) -> RecsysOutput:
        """The per-task networks' outputs as one multi-task output."""
        return RecsysOutput(
            logits_BT=torch.cat([o.logits_BT for o in outs], 1),
            predictions_BT=torch.cat([o.predictions_BT for o in outs], 1),
            gate_weights=None,
            embedding_sq=torch.stack([o.embedding_sq for o in outs]).sum(),
        )


def gate_labels(config: ModelConfig) -> list[list[str]] | None:
    """Column names of each task's gate weights (None for models without gates)."""
    names = [t.name for t in config.tasks]
    if config.model == "mmoe":
        return [[f"e{j}" for j in range(config.num_experts)] for _ in names]
    if config.model == "ple":
        shared = [f"shared{j}" for j in range(config.num_shared_experts)]
        return [[f"{n}{j}" for j in range(config.num_task_experts)] + shared for n in names]
    return None


def build_model(config: ModelConfig) -> nn.Module:
    """The recsys model of ``config.model`` ("single" | "shared-bottom" | "mmoe" | "ple")."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a recsys ModelConfig, got {type(config).__name__}")
    if not config.vocab:
        raise ValueError("config.vocab is empty: set the feature sizes with with_vocab(config, ...)")
    if config.model == "single":
        return SingleTaskModels(config)
    return MultiTaskRecommender(config, config.tasks, config.model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters of the embedding tables and of everything else."""
    emb = sum(p.numel() for n, p in model.named_parameters() if "embedding_bags" in n)
    total = sum(p.numel() for p in model.parameters())
    return {"embeddings": emb, "dense": total - emb, "total": total}
