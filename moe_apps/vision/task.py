"""The vision task: label-smoothed cross-entropy (Szegedy et al. 2016) for training, accuracy for
validation, and inference with airbench94's multi-view test-time augmentation (Keller Jordan 2024):
the logits of the image and its mirror image (weight 1/2), averaged with those of the image and
its mirror shifted by one pixel up-left and down-right (weight 1/2 for the four), six views in all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_apps.vision.data import VisionBatch, translate


@dataclass(frozen=True)
class Predictions:
    """``probs_NC`` (softmax of the TTA-averaged logits, float32) and, per expert stage,
    ``experts[name]`` the top-1 expert of each image in its plain view (int64 ``(N,)``)."""

    probs_NC: Tensor
    experts: dict[str, Tensor]


class VisionTask:
    """What the shared loop calls: the loss of a batch and the validation metrics."""

    def __init__(self, label_smoothing: float, prefix: str = "") -> None:
        self.label_smoothing, self.prefix = label_smoothing, prefix

    def training_loss(self, model: nn.Module, batch: VisionBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits_BC = model(batch.images_BCHW).logits_BC
        loss = F.cross_entropy(logits_BC, batch.labels_B, label_smoothing=self.label_smoothing)
        accuracy = (logits_BC.detach().argmax(1) == batch.labels_B).float().mean()
        return loss, {"accuracy": accuracy}

    def evaluate(self, model: nn.Module, batches: Iterable[VisionBatch]) -> dict[str, float]:
        """Plain-view accuracy and (unsmoothed) cross-entropy over ``batches`` (keys prefixed with
        ``prefix``: "seen_" when the batches are training images)."""
        correct = torch.zeros((), dtype=torch.float64)
        loss = torch.zeros((), dtype=torch.float64)
        count = 0
        for batch in batches:
            logits_BC = model(batch.images_BCHW).logits_BC.float()
            correct += (logits_BC.argmax(1) == batch.labels_B).sum().cpu()
            loss += F.cross_entropy(logits_BC, batch.labels_B, reduction="sum").double().cpu()
            count += len(batch)
        if count == 0:
            raise ValueError("the validation part is empty")
        return {f"{self.prefix}accuracy": float(correct) / count, f"{self.prefix}loss": float(loss) / count}


def tta_logits(model: nn.Module, images_BCHW: Tensor, tta: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits ``(B, C)`` float32 (six-view average when ``tta``) and the plain view's experts."""
    out = model(images_BCHW)
    experts = {name: index_BK[:, 0] for name, index_BK in out.experts.items()}
    if not tta:
        return out.logits_BC.float(), experts

    def mirror(x: Tensor, first: Tensor | None = None) -> Tensor:
        plain = model(x).logits_BC.float() if first is None else first
        return 0.5 * (plain + model(x.flip(-1)).logits_BC.float())

    base = mirror(images_BCHW, out.logits_BC.float())
    B = images_BCHW.shape[0]
    shifted = [mirror(translate(images_BCHW, torch.full((B, 2), s, dtype=torch.long), 1)) for s in (-1, 1)]
    return 0.5 * base + 0.25 * (shifted[0] + shifted[1]), experts


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[VisionBatch], *, tta: bool, device: torch.device,
            precision: str = "bf16") -> Predictions:
    """Probabilities of every image of ``batches`` (eval mode, no grad, autocast as in training)."""
    from moe_apps.training.runtime import autocast

    model.eval()
    probs, experts = [], {}
    for batch in batches:
        with autocast(device, precision):
            logits_BC, chosen = tta_logits(model, batch.images_BCHW.to(device), tta)
        probs.append(logits_BC.float().softmax(-1).cpu())
        for name, index_B in chosen.items():
            experts.setdefault(name, []).append(index_B.cpu())
    if not probs:
        raise ValueError("no images to predict")
    return Predictions(torch.cat(probs), {name: torch.cat(parts) for name, parts in experts.items()})
