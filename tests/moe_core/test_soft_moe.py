"""SoftMoE (moe_core.soft_moe) vs a per-sequence, per-slot, per-token loop with explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from moe_core.experts import ConvExperts, ExpertBank, ModuleExperts
from moe_core.layer import MoEOutput
from moe_core.soft_moe import SoftMoE


def _softmax(values: list[Tensor]) -> list[Tensor]:
    top = max(float(v.detach()) for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _bank_expert(bank: ExpertBank, e: int, v_D: Tensor) -> Tensor:
    h = v_D @ bank.w_in[e]
    return (0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))) @ bank.w_out[e]


def _reference(layer: SoftMoE, expert_fn, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Soft-MoE by hand: one sequence, one slot and one token at a time."""
    B, N, D = x.shape
    E, S = layer.num_experts, layer.slots_per_expert
    phi = layer.phi
    if layer.normalize:
        phi = layer.scale * phi / phi.norm(dim=0, keepdim=True)
    out_rows = []
    for b in range(B):
        real = [n for n in range(N) if mask is None or bool(mask[b, n])]
        tok = [x[b, n] / x[b, n].norm() if layer.normalize else x[b, n] for n in range(N)]
        logit = [[(tok[n] * phi[:, m]).sum() for m in range(E * S)] for n in range(N)]
        slot_out = []
        for m in range(E * S):
            if real:
                weights = _softmax([logit[n][m] for n in real])  # over tokens
                slot_in = sum(w * x[b, n] for w, n in zip(weights, real, strict=True))
            else:
                slot_in = torch.zeros(D, dtype=x.dtype)
            slot_out.append(expert_fn(m // S, slot_in))  # slot m belongs to expert m // S
        rows = []
        for n in range(N):
            if mask is not None and not bool(mask[b, n]):
                rows.append(torch.zeros_like(slot_out[0]))
                continue
            weights = _softmax(logit[n])  # over slots
            rows.append(sum(w * y for w, y in zip(weights, slot_out, strict=True)))
        out_rows.append(torch.stack(rows))
    return torch.stack(out_rows)


@pytest.mark.parametrize(
    ("num_experts", "slots", "normalize"), [(3, 1, False), (2, 3, False), (3, 2, True)]
)
def test_matches_loop_outputs_and_gradients(num_experts: int, slots: int, normalize: bool) -> None:
    torch.manual_seed(0)
    bank = ExpertBank(num_experts, 4, 5).double()
    layer = SoftMoE(4, bank, slots_per_expert=slots, normalize=normalize).double()
    if normalize:
        with torch.no_grad():
            layer.scale.fill_(1.7)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert isinstance(out, MoEOutput) and out.aux_losses == {}
    ref = _reference(layer, lambda e, v: _bank_expert(bank, e, v), x)
    torch.testing.assert_close(out.output, ref)

    probe = torch.randn_like(ref)
    params = [x, layer.phi, bank.w_in, bank.w_out] + ([layer.scale] if normalize else [])
    got = torch.autograd.grad((out.output * probe).sum(), params)
    want = torch.autograd.grad((ref * probe).sum(), params)
    for g, w in zip(got, want, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w)


def test_module_experts_with_other_output_width() -> None:
    torch.manual_seed(1)
    experts = [nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Linear(4, 3)]
    layer = SoftMoE(4, ModuleExperts(experts), slots_per_expert=2).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    out = layer(x).output
    assert out.shape == (3, 6, 3)
    torch.testing.assert_close(out, _reference(layer, lambda e, v: experts[e](v), x))


def test_padding_mask() -> None:
    torch.manual_seed(2)
    bank = ExpertBank(2, 4, 6).double()
    layer = SoftMoE(4, bank, slots_per_expert=2).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = layer(x, token_mask=mask)
    torch.testing.assert_close(
        out.output, _reference(layer, lambda e, v: _bank_expert(bank, e, v), x, mask)
    )
    assert out.output[~mask].abs().max() == 0
    # the real tokens of a sequence padded at the end see exactly the unpadded sequence
    torch.testing.assert_close(out.output[0, :3], layer(x[:1, :3]).output[0])
    assert out.routing.probs_TE.shape == (int(mask.sum()), 2)
    assert not torch.isnan(out.output).any()


def test_permutation_equivariance_and_batch_independence() -> None:
    torch.manual_seed(3)
    layer = SoftMoE(6, ExpertBank(4, 6, 8), slots_per_expert=2)
    x = torch.randn(3, 7, 6)
    out = layer(x).output
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]).output, out[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[1:2]).output, out[1:2], rtol=1e-5, atol=1e-5)


def test_weights_are_normalized_and_stats() -> None:
    torch.manual_seed(4)
    layer = SoftMoE(4, ExpertBank(3, 4, 5), slots_per_expert=2)
    x = torch.randn(2, 5, 4)
    logits = layer.logits(x)
    assert logits.shape == (2, 5, 6)
    torch.testing.assert_close(logits, torch.einsum("bnd,dm->bnm", x, layer.phi.detach()))
    out = layer(x)
    # the routing: per token, its combine weights summed over each expert's slots (e * S + s)
    combine = logits.detach().softmax(-1).reshape(10, 6)
    by_expert = torch.stack([combine[:, 2 * e] + combine[:, 2 * e + 1] for e in range(3)], dim=1)
    torch.testing.assert_close(out.routing.probs_TE, by_expert)
    torch.testing.assert_close(out.routing.probs_TE.sum(-1), torch.ones(10))
    assert out.stats.tokens_per_expert_E.tolist() == [10, 10, 10]
    assert 0 < out.stats.entropy <= math.log(3) + 1e-6
    assert layer.last_aux_losses == {} and layer.last_stats is out.stats
    assert SoftMoE(4, ExpertBank(3, 4, 5), track_stats=False)(x).stats is None


def test_gradients_reach_every_expert_and_phi() -> None:
    torch.manual_seed(5)
    experts = ModuleExperts([nn.Linear(4, 4) for _ in range(3)])
    layer = SoftMoE(4, experts, slots_per_expert=2, normalize=True)
    layer(torch.randn(2, 6, 4)).output.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_bad_inputs_and_configs_raise_value_error() -> None:
    layer = SoftMoE(4, ExpertBank(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, N, d_model=4\)"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 5, 4), token_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 5, 4), token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(4, ExpertBank(2, 4, 5), slots_per_expert=0)
    with pytest.raises(ValueError, match="experts.d_model=4"):
        SoftMoE(6, ExpertBank(2, 4, 5))
    with pytest.raises(ValueError, match="forward_batched"):
        SoftMoE(4, nn.Linear(4, 4))
    with pytest.raises(ValueError, match="feature_dims"):
        SoftMoE(4, ConvExperts(2, 4))
