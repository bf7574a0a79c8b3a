"""Tests for moe_core.losses: hand-computed values, masking, layer collection, coefficients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_core.losses import (
    AUX_LOSS_NAMES,
    collect_aux_losses,
    dense_gates,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    weighted_aux_loss,
)
from moe_core.routing import Routing

PROBS_2x2 = torch.tensor([[0.7, 0.3], [0.4, 0.6]])


def test_load_balance_hand_values_top1() -> None:
    # P = mean probs = [0.55, 0.45].
    # both tokens to expert 0: f = [1, 0] -> 2 * (1 * 0.55) = 1.1
    collapsed = load_balancing_loss(PROBS_2x2, torch.tensor([[0], [0]]))
    assert collapsed.item() == pytest.approx(1.1, abs=1e-6)
    # one token each: f = [0.5, 0.5] -> 2 * (0.5 * 0.55 + 0.5 * 0.45) = 1.0
    spread = load_balancing_loss(PROBS_2x2, torch.tensor([[0], [1]]))
    assert spread.item() == pytest.approx(1.0, abs=1e-6)


def test_load_balance_hand_values_top2() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    # 4 assignments: expert 0 twice, experts 1 and 2 once -> f = [0.5, 0.25, 0.25]
    # P = [0.35, 0.25, 0.40]; 3 * (0.175 + 0.0625 + 0.1) = 1.0125
    loss = load_balancing_loss(probs, torch.tensor([[0, 1], [2, 0]]))
    assert loss.item() == pytest.approx(1.0125, abs=1e-6)


def test_load_balance_uniform_is_one_and_collapsed_is_num_experts() -> None:
    E = 4
    uniform = load_balancing_loss(torch.full((E, E), 1 / E), torch.arange(E)[:, None])
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    collapsed_probs = torch.zeros(E, E)
    collapsed_probs[:, 0] = 1.0
    collapsed = load_balancing_loss(collapsed_probs, torch.zeros(E, 1, dtype=torch.int64))
    assert collapsed.item() == pytest.approx(float(E), abs=1e-6)
    assert collapsed > uniform


def test_load_balance_gradient_flows_through_probs_only() -> None:
    probs = PROBS_2x2.clone().requires_grad_(True)
    load_balancing_loss(probs, torch.tensor([[0], [0]])).backward()
    # d/dprobs[t, e] = E * f_e / T = 2 * [1, 0] / 2
    torch.testing.assert_close(probs.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_z_loss_hand_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp rows: ln 2 and ln 4 = 2 ln 2 -> mean of squares = (1 + 4) / 2 * (ln 2)^2
    expected = 2.5 * math.log(2.0) ** 2  # 1.2011325...
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32


def test_importance_hand_value() -> None:
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    # importance = [2, 0.5, 0.5], mean 1, population variance (1 + 0.25 + 0.25) / 3 = 0.5
    assert importance_loss(gates).item() == pytest.approx(0.5, abs=1e-6)
    assert importance_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-7)
    assert importance_loss(torch.ones(3, 1)).item() == 0.0  # one expert: population std 0


@pytest.mark.parametrize("loss_name", ["balance", "z", "importance"])
def test_masks_leave_padding_out(loss_name: str) -> None:
    g = torch.Generator().manual_seed(0)
    T, E = 7, 4
    logits = torch.randn(T, E, generator=g)
    probs = logits.softmax(-1)
    indices = probs.topk(2, dim=-1).indices
    mask = torch.tensor([True, False, True, True, False, True, False])
    if loss_name == "balance":
        padded = load_balancing_loss(probs, indices, mask)
        plain = load_balancing_loss(probs[mask], indices[mask])
    elif loss_name == "z":
        padded = router_z_loss(logits, mask)
        plain = router_z_loss(logits[mask])
    else:
        padded = importance_loss(probs, mask)
        plain = importance_loss(probs[mask])
    torch.testing.assert_close(padded, plain)
    # garbage in the padded rows must not matter
    logits2 = logits.clone()
    logits2[~mask] = 1e4
    if loss_name == "z":
        torch.testing.assert_close(router_z_loss(logits2, mask), plain)


def test_all_masked_gives_zero_not_nan() -> None:
    mask = torch.zeros(3, dtype=torch.bool)
    probs = torch.full((3, 2), 0.5)
    for value in (
        load_balancing_loss(probs, torch.zeros(3, 1, dtype=torch.int64), mask),
        router_z_loss(torch.randn(3, 2), mask),
        importance_loss(probs, mask),
    ):
        assert value.item() == 0.0


def test_bad_inputs_raise() -> None:
    probs = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="mask_T"):
        load_balancing_loss(probs, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="mask_T"):
        router_z_loss(probs, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expert_indices_TK"):
        load_balancing_loss(probs, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="probs_TE"):
        load_balancing_loss(probs[0], torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="gates_TE"):
        importance_loss(torch.ones(2, 2, 2))


def test_dense_gates_scatters_combine_weights() -> None:
    routing = Routing(
        probs_TE=torch.full((3, 4), 0.25),
        expert_indices_TK=torch.tensor([[2, 0], [1, 3], [0, 2]]),
        combine_weights_TK=torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]]),
    )
    expected = torch.tensor([[0.4, 0.0, 0.6, 0.0], [0.0, 0.9, 0.0, 0.1], [0.5, 0.0, 0.5, 0.0]])
    torch.testing.assert_close(dense_gates(routing), expected)
    expert_choice = Routing(
        probs_TE=torch.full((3, 2), 0.5),
        token_indices_EC=torch.tensor([[2, 0], [0, 1]]),
        combine_weights_EC=torch.tensor([[0.7, 0.2], [0.3, 0.8]]),
    )
    expected_ec = torch.tensor([[0.2, 0.3], [0.0, 0.8], [0.7, 0.0]])
    torch.testing.assert_close(dense_gates(expert_choice), expected_ec)


class _FakeLayer(nn.Module):
    def __init__(self, aux: dict[str, torch.Tensor] | None) -> None:
        super().__init__()
        self.last_aux_losses = aux


def test_collect_aux_losses_sums_over_layers() -> None:
    lb = torch.tensor(1.0, requires_grad=True)
    model = nn.Sequential(
        _FakeLayer({"load_balance": lb, "z_loss": torch.tensor(2.0)}),
        nn.Linear(2, 2),  # no attribute: skipped
        nn.Sequential(_FakeLayer({"load_balance": torch.tensor(3.0)}), _FakeLayer(None)),
    )
    aux = collect_aux_losses(model)
    assert set(aux) == {"load_balance", "z_loss"}
    assert aux["load_balance"].item() == 4.0
    assert aux["z_loss"].item() == 2.0
    aux["load_balance"].backward()
    assert lb.grad is not None and lb.grad.item() == 1.0
    assert collect_aux_losses(nn.Linear(2, 2)) == {}


def test_weighted_aux_loss_applies_coefficients() -> None:
    aux = {"load_balance": torch.tensor(4.0), "z_loss": torch.tensor(2.0)}
    # "importance" has a coefficient but no layer produced it: contributes 0
    coefficients = {"load_balance": 0.01, "z_loss": 0.001, "importance": 0.1}
    assert weighted_aux_loss(aux, coefficients).item() == pytest.approx(0.042, abs=1e-7)
    # a loss without a coefficient is not added
    assert weighted_aux_loss(aux, {"z_loss": 0.5}).item() == pytest.approx(1.0)
    assert weighted_aux_loss({}, {"load_balance": 0.01}).item() == 0.0
    assert set(AUX_LOSS_NAMES) == {"load_balance", "z_loss", "importance"}


def test_weighted_aux_loss_rejects_unknown_or_bad_coefficients() -> None:
    aux = {"z_loss": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="zloss.*load_balance"):
        weighted_aux_loss(aux, {"zloss": 0.001})
    with pytest.raises(ValueError, match="z_loss"):
        weighted_aux_loss(aux, {"z_loss": -1.0})
    with pytest.raises(ValueError, match="z_loss"):
        weighted_aux_loss(aux, {"z_loss": float("nan")})
