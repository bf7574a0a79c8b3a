"""The translation `Task` for the shared training loop: label-smoothed token cross-entropy.

Training loss: ``F.cross_entropy(label_smoothing=eps)`` over the real target tokens (padding
ignored; Szegedy et al. 2016, as in Vaswani et al. 2017), averaged per token. The task owns the
smoothing (the platform's convention). Validation: the plain per-token cross-entropy ``loss``
(nats) and its perplexity ``ppl``, teacher-forced; BLEU is measured by `eval` on decoded text.

Shape legend: B sentences, T target length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_apps.translation.data import TranslationBatch
from moe_apps.translation.vocab import PAD


def token_cross_entropy(logits_BTV: Tensor, targets_BT: Tensor, *, label_smoothing: float = 0.0,
                        reduction: str = "mean") -> Tensor:
    """Cross-entropy (float32) of every non-pad target token, mean or sum."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=PAD,
                           label_smoothing=label_smoothing, reduction=reduction)


class TranslationTask:
    """Implements the `moe_apps.training.Task` protocol for `Seq2SeqTransformer`."""

    def __init__(self, label_smoothing: float) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def training_loss(self, model: nn.Module, batch: TranslationBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits_BTV = model(batch)
        loss = token_cross_entropy(logits_BTV, batch.tgt_out_BT, label_smoothing=self.label_smoothing)
        return loss, {"target_tokens": (batch.tgt_out_BT != PAD).sum()}

    def evaluate(self, model: nn.Module, batches: Iterable[TranslationBatch]) -> dict[str, float]:
        total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for batch in batches:
            logits_BTV = model(batch)
            total += token_cross_entropy(logits_BTV, batch.tgt_out_BT, reduction="sum").double().cpu()
            tokens += int((batch.tgt_out_BT != PAD).sum())
        if tokens == 0:
            raise ValueError("no validation tokens to evaluate (empty validation set)")
        loss = float(total) / tokens
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
