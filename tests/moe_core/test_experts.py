"""Experts modules vs independent per-expert loops written with plain torch ops (outputs and grads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_core.experts import EXPERTS, FFN, ConvExperts, ExpertBank, ModuleExperts


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.clamp(h, min=0)
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / 2**0.5))
    half = h.shape[-1] // 2
    a, b = h[..., :half], h[..., half:]
    return a * torch.sigmoid(a) * b


def _bank_expert(bank: ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the bank applied row by row with plain matmuls on its weights."""
    h = x @ bank.w_in[e]
    if bank.b_in is not None:
        h = h + bank.b_in[e]
    y = _act(h, bank.activation) @ bank.w_out[e]
    if bank.b_out is not None:
        y = y + bank.b_out[e]
    return y


def _assert_same_grads(out: torch.Tensor, ref: torch.Tensor, inputs: list[torch.Tensor], **tol) -> None:
    """Assert ``out`` and ``ref`` have the same gradients wrt ``inputs`` (same random output grad);
    ``tol``: ``atol`` / ``rtol`` for `torch.testing.assert_close`."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    got, want = torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def _reference_grouped(expert_fn, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row i goes to the expert whose block holds it; rows after sum(counts) give zeros."""
    rows, start = [], 0
    for e, c in enumerate(counts):
        for i in range(start, start + c):
            rows.append(expert_fn(e, x[i : i + 1]))
        start += c
    for _ in range(start, x.shape[0]):
        rows.append(torch.zeros_like(expert_fn(0, x[:1])))
    return torch.cat(rows)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("method", "d_model"),
    [("auto", 8), ("auto", 6), ("padded", 8), ("grouped", 8), ("loop", 8), ("loop", 6), ("padded", 6),
     ("bucketed", 8), ("bucketed", 6)],
)  # d_model=6: rows not 16-byte aligned, grouped GEMM unavailable
def test_expert_bank_forward_matches_loop(
    activation: str, bias: bool, method: str, d_model: int, many_tiers: None
) -> None:
    torch.manual_seed(0)
    bank = ExpertBank(4, d_model, 12, activation=activation, bias=bias, method=method)
    if bias:  # nonzero biases so that a missing bias would show
        nn.init.normal_(bank.b_in)
        nn.init.normal_(bank.b_out)
    counts = [3, 0, 5, 2]
    x = torch.randn(13, d_model, requires_grad=True)  # 3 trailing dropped rows
    y = bank(x, torch.tensor(counts))
    ref = _reference_grouped(lambda e, r: _bank_expert(bank, e, r), x, counts)
    torch.testing.assert_close(y, ref)
    assert torch.count_nonzero(y[10:]) == 0
    params = [x, *bank.parameters()]
    _assert_same_grads(y, ref, params)


@pytest.mark.parametrize("method", ["auto", "padded", "bucketed", "grouped", "loop"])
def test_expert_bank_uneven_counts_and_zero_strided_grad(method: str) -> None:
    # very uneven counts (auto falls back from padding); y.sum() gives a zero-stride incoming grad
    torch.manual_seed(1)
    bank = ExpertBank(3, 16, 32, activation="gelu", method=method)
    counts = [60, 0, 5]
    x = torch.randn(70, 16, requires_grad=True)
    y = bank(x, torch.tensor(counts))
    ref = _reference_grouped(lambda e, r: _bank_expert(bank, e, r), x, counts)
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y.sum(), [x, bank.w_in, bank.w_out])
    want = torch.autograd.grad(ref.sum(), [x, bank.w_in, bank.w_out])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_bank_dense_and_batched(activation: str) -> None:
    torch.manual_seed(2)
    bank = ExpertBank(3, 8, 10, activation=activation, bias=True)
    nn.init.normal_(bank.b_out)
    x = torch.randn(5, 8, requires_grad=True)
    dense = bank.forward_dense(x)
    ref = torch.stack([_bank_expert(bank, e, x) for e in range(3)], dim=1)
    assert dense.shape == (5, 3, 8)
    torch.testing.assert_close(dense, ref)
    params = [x, *bank.parameters()]
    _assert_same_grads(dense, ref, params)

    xb = torch.randn(3, 4, 8, requires_grad=True)
    batched = bank.forward_batched(xb)
    ref_b = torch.stack([_bank_expert(bank, e, xb[e]) for e in range(3)])
    torch.testing.assert_close(batched, ref_b)
    params = [xb, *bank.parameters()]
    _assert_same_grads(batched, ref_b, params)


def test_expert_bank_init_and_shapes() -> None:
    bank = ExpertBank(5, 16, 64, activation="swiglu", bias=True)
    assert bank.w_in.shape == (5, 16, 128) and bank.w_out.shape == (5, 64, 16)
    assert bank.b_in.shape == (5, 128) and bank.b_out.shape == (5, 16)
    assert bank.w_in.abs().max() <= 16**-0.5 and bank.w_out.abs().max() <= 64**-0.5
    assert bank.num_experts == 5 and bank.feature_dims == 1
    # experts are initialised independently
    assert not torch.equal(bank.w_in[0], bank.w_in[1])


def test_module_experts_heterogeneous() -> None:
    torch.manual_seed(3)
    modules = [
        nn.Linear(6, 4),
        nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)),
        nn.Linear(6, 4),
    ]
    experts = ModuleExperts(modules)
    assert experts.num_experts == 3 and experts.feature_dims == 1
    counts = [2, 4, 1]
    x = torch.randn(9, 6, requires_grad=True)
    y = experts(x, torch.tensor(counts))
    ref = _reference_grouped(lambda e, r: modules[e](r), x, counts)
    torch.testing.assert_close(y, ref)
    params = [x, *experts.parameters()]
    _assert_same_grads(y, ref, params)

    dense = experts.forward_dense(x)
    torch.testing.assert_close(dense, torch.stack([m(x) for m in modules], dim=1))
    xb = torch.randn(3, 2, 6)
    torch.testing.assert_close(
        experts.forward_batched(xb), torch.stack([m(xb[e]) for e, m in enumerate(modules)])
    )


def _conv_expert(conv: ConvExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on ``x`` with per-sample normalisation (GroupNorm or none), from its formulas."""
    h = F.conv2d(x, conv.weight[e], conv.bias[e], padding=conv.kernel_size // 2)
    if conv.norm == "group":
        n, c, hh, ww = h.shape
        g = h.reshape(n, conv.norm_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        h = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, hh, ww)
        h = h * conv.norm_weight[e].view(1, c, 1, 1) + conv.norm_bias[e].view(1, c, 1, 1)
    if conv.activation is None:
        return h
    return _act(h, conv.activation) if conv.activation != "silu" else h * torch.sigmoid(h)


@pytest.mark.parametrize(
    ("norm", "norm_groups", "activation"),
    [(None, 1, "relu"), ("group", 2, "relu"), ("group", 1, "gelu"), ("group", 2, None), (None, 1, "silu")],
)
def test_conv_experts_match_per_expert_conv(norm: str | None, norm_groups: int, activation: str | None) -> None:
    torch.manual_seed(4)
    conv = ConvExperts(3, in_channels=3, out_channels=4, kernel_size=3, norm=norm,
                       norm_groups=norm_groups, activation=activation)
    if norm:
        nn.init.normal_(conv.norm_weight)
        nn.init.normal_(conv.norm_bias)
    assert conv.feature_dims == 3
    counts = [2, 0, 3]
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    y = conv(x, torch.tensor(counts))
    ref = _reference_grouped(lambda e, r: _conv_expert(conv, e, r), x, counts)
    assert y.shape == (6, 4, 5, 5)
    torch.testing.assert_close(y, ref)
    params = [x, *conv.parameters()]
    _assert_same_grads(y, ref, params, atol=1e-4, rtol=1e-4)

    dense = conv.forward_dense(x)
    torch.testing.assert_close(
        dense, torch.stack([_conv_expert(conv, e, x) for e in range(3)], dim=1)
    )
    xb = torch.randn(3, 2, 3, 5, 5, requires_grad=True)
    batched = conv.forward_batched(xb)
    ref_b = torch.stack([_conv_expert(conv, e, xb[e]) for e in range(3)])
    torch.testing.assert_close(batched, ref_b)
    params = [xb, *conv.parameters()]
    _assert_same_grads(batched, ref_b, params, atol=1e-4, rtol=1e-4)  # sums over 2*25 positions


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_ffn_matches_plain_mlp(activation: str) -> None:
    torch.manual_seed(5)
    ffn = FFN(6, 10, activation)
    x = torch.randn(2, 3, 6)
    h = x @ ffn.fc_in.weight.t() + ffn.fc_in.bias
    ref = _act(h, activation) @ ffn.fc_out.weight.t() + ffn.fc_out.bias
    torch.testing.assert_close(ffn(x), ref)
    assert ffn.fc_in.out_features == (20 if activation == "swiglu" else 10)


def test_bf16_bank_runs_in_bf16() -> None:
    bank32 = ExpertBank(2, 16, 32)
    bank = ExpertBank(2, 16, 32).to(torch.bfloat16)
    bank.load_state_dict(bank32.state_dict())
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    counts = torch.tensor([12, 8])
    y = bank(x, counts)
    assert y.dtype == torch.bfloat16
    ref = _reference_grouped(lambda e, r: _bank_expert(bank32, e, r), x.float(), [12, 8])
    torch.testing.assert_close(y.float(), ref.float(), atol=5e-2, rtol=5e-2)


def test_registry_and_errors() -> None:
    assert EXPERTS == {"ffn_bank": ExpertBank, "modules": ModuleExperts, "conv": ConvExperts}
    with pytest.raises(ValueError, match="activation"):
        ExpertBank(2, 4, 4, activation="tanh")
    with pytest.raises(ValueError, match="num_experts"):
        ExpertBank(0, 4, 4)
    with pytest.raises(ValueError, match="modules"):
        ModuleExperts([])
    with pytest.raises(ValueError, match="kernel_size"):
        ConvExperts(2, 3, kernel_size=2)
    with pytest.raises(ValueError, match="norm_groups"):
        ConvExperts(2, 3, out_channels=5, norm_groups=2)
    with pytest.raises(ValueError, match="use norm=None"):
        ConvExperts(2, 3, norm_groups=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvExperts(2, 3, norm="layer")
    with pytest.raises(ValueError, match="activation must be one of"):
        ConvExperts(2, 3, activation="tanh")
    for method in ("auto", "padded", "bucketed", "grouped", "loop"):
        with pytest.raises(ValueError, match="counts_E"):
            ExpertBank(2, 4, 4, method=method)(torch.randn(3, 4), torch.tensor([2, 2]))
        with pytest.raises(ValueError, match="counts_E"):
            ExpertBank(2, 4, 4, method=method)(torch.randn(3, 4), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="method"):
        ExpertBank(2, 4, 4, method="fast")
    with pytest.raises(ValueError, match="method='grouped'"):
        ExpertBank(2, 6, 4, method="grouped")(torch.randn(3, 6), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="x_SD"):
        ExpertBank(2, 4, 4)(torch.randn(3, 5), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="counts_E"):
        ModuleExperts([nn.Linear(4, 4), nn.Linear(4, 4)])(torch.randn(3, 4), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="counts_E"):
        ConvExperts(2, 3)(torch.randn(3, 3, 4, 4), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="in_channels"):
        ConvExperts(2, 3)(torch.randn(4, 5, 6, 6), torch.tensor([2, 2]))
