"""The MoE layer vs a naive per-token reference (outputs and gradients), and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.experts import FFN, ConvExperts, ExpertBank, ModuleExperts
from moe_core.layer import MoE, MoEOutput
from moe_core.losses import collect_aux_losses, importance_loss, load_balancing_loss, router_z_loss
from moe_core.routers import ROUTERS, SwitchRouter, TopKRouter
from moe_core.routing import Routing

D, H, E = 8, 12, 4
VOCAB = 50


def _gelu(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1 + torch.erf(h / 2**0.5))


def _bank_expert(bank: ExpertBank, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e of the bank on one token, straight from its weights (gelu, no bias)."""
    return _gelu(x_D @ bank.w_in[e]) @ bank.w_out[e]


def _priority_slots(routing: Routing) -> list[tuple[int, int, torch.Tensor]]:
    """(token, expert, weight) in the documented priority order: all first choices in token order,
    then all second choices, ...; expert choice: expert by expert in its pick order."""
    if routing.expert_indices_TK is not None:
        T, K = routing.expert_indices_TK.shape
        return [
            (t, int(routing.expert_indices_TK[t, k]), routing.combine_weights_TK[t, k])
            for k in range(K)
            for t in range(T)
        ]
    E_, C = routing.token_indices_EC.shape
    return [
        (int(routing.token_indices_EC[e, c]), e, routing.combine_weights_EC[e, c])
        for e in range(E_)
        for c in range(C)
    ]


def reference_moe(
    expert_fn, x_T: torch.Tensor, routing: Routing, capacity: int | None, num_experts: int
) -> tuple[torch.Tensor, list[bool], list[int]]:
    """Loop over tokens and their experts; drop a slot once its expert holds ``capacity`` slots."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(x_T.shape[0])]
    counts = [0] * num_experts
    kept = []
    for t, e, w in _priority_slots(routing):
        if capacity is not None and counts[e] >= capacity:
            kept.append(False)
            continue
        counts[e] += 1
        kept.append(True)
        rows[t].append(w.to(x_T.dtype) * expert_fn(e, x_T[t]))
    zero = torch.zeros_like(expert_fn(0, x_T[0]))
    out = torch.stack([sum(r, zero) if r else zero for r in rows])
    return out, kept, counts


def _make_router(name: str) -> nn.Module:
    if name == "hierarchical":
        return ROUTERS[name](D, E, num_groups=2, top_k_groups=1, top_k_experts=2)
    if name == "hash":
        return ROUTERS[name](D, E, vocab_size=VOCAB)
    if name == "topk":
        return ROUTERS[name](D, E, top_k=2)
    return ROUTERS[name](D, E)


def _check_against_reference(layer: MoE, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
    out = layer(x, token_ids=token_ids)
    x_T = x.reshape(-1, D)
    routing = layer.router(x_T, token_ids_T=None if token_ids is None else token_ids.reshape(-1))
    capacity = layer.capacity(x_T.shape[0], routing.top_k)
    ref, kept, counts = reference_moe(
        lambda e, r: _bank_expert(layer.experts, e, r), x_T, routing, capacity, E
    )
    if layer.shared_experts is not None:
        ref = ref + layer.shared_experts(x_T)
    ref = ref.reshape(x.shape)
    torch.testing.assert_close(out.output, ref)
    # same drops, same per-expert counts, never more than C
    assert out.stats.tokens_per_expert_E.tolist() == counts
    if capacity is not None:
        assert max(counts) <= capacity
    if not routing.is_expert_choice:
        assert out.stats.dropped_fraction == pytest.approx(kept.count(False) / len(kept))
    # gradients wrt input, router parameters and expert weights
    params = [x, *layer.parameters()]
    params = [p for p in params if p.requires_grad]
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(out.output, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("router_name", sorted(ROUTERS))
def test_every_router_through_the_layer_matches_the_per_token_reference(
    router_name: str, capacity_factor: float | None
) -> None:
    torch.manual_seed(0)
    router = _make_router(router_name)
    layer = MoE(router, ExpertBank(E, D, H), capacity_factor=capacity_factor).eval()
    x = torch.randn(3, 5, D, requires_grad=True)
    ids = torch.randint(0, VOCAB, (3, 5)) if router_name == "hash" else None
    _check_against_reference(layer, x, ids)


@pytest.mark.parametrize("method", ["padded", "bucketed", "grouped", "loop"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.25])
def test_topk_every_kernel_with_shared_experts(
    method: str, capacity_factor: float | None, many_tiers: None
) -> None:
    torch.manual_seed(1)
    layer = MoE(
        TopKRouter(D, E, top_k=2),
        ExpertBank(E, D, H, method=method),
        shared_experts=FFN(D, 6),
        capacity_factor=capacity_factor,
    )
    x = torch.randn(2, 9, D, requires_grad=True)
    _check_against_reference(layer, x)


def test_capacity_drops_second_choices_first() -> None:
    # every token's first choice is expert 0 and second choice expert 1; C = 3 keeps the first 3
    # tokens' first choices and the first 3 tokens' second choices
    T = 6
    idx = torch.tensor([[0, 1]] * T)
    w = torch.full((T, 2), 0.5, requires_grad=True)

    class Fixed(nn.Module):
        num_experts, d_model = E, D

        def forward(self, x, *, token_ids_T=None):
            probs = torch.full((x.shape[0], E), 1.0 / E)
            return Routing(probs, None, expert_indices_TK=idx, combine_weights_TK=w)

    layer = MoE(Fixed(), ExpertBank(E, D, H), capacity_factor=1.0)  # C = ceil(6 * 2 / 4) = 3
    assert layer.capacity(T, 2) == 3
    x = torch.randn(T, D)
    out = layer(x)
    bank = layer.experts
    for t in range(T):
        want = sum(0.5 * _bank_expert(bank, e, x[t]) for e in (0, 1)) if t < 3 else torch.zeros(D)
        torch.testing.assert_close(out.output[t], want)
    assert out.stats.tokens_per_expert_E.tolist() == [3, 3, 0, 0]
    assert out.stats.dropped_fraction == pytest.approx(0.5)


def test_dropless_is_permutation_equivariant() -> None:
    torch.manual_seed(2)
    layer = MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H))
    x = torch.randn(20, D)
    perm = torch.randperm(20)
    torch.testing.assert_close(layer(x[perm]).output, layer(x).output[perm])


def test_token_mask_leaves_padding_out() -> None:
    torch.manual_seed(3)
    shared = FFN(D, 6)
    layer = MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H), shared_experts=shared, capacity_factor=1.0)
    x = torch.randn(2, 7, D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 3:] = False
    padded = layer(x, token_mask=mask)
    real = layer(x[mask])  # the real tokens alone, in order
    torch.testing.assert_close(padded.output[mask], real.output)
    torch.testing.assert_close(padded.output[~mask], shared(x[~mask]))  # shared only
    for name in ("load_balance", "z_loss", "importance"):
        torch.testing.assert_close(padded.aux_losses[name], real.aux_losses[name])
    assert padded.stats.tokens_per_expert_E.tolist() == real.stats.tokens_per_expert_E.tolist()
    no_shared = MoE(layer.router, layer.experts)
    assert no_shared(x, token_mask=mask).output[~mask].abs().max() == 0
    # nothing real at all: shared experts only, zero losses
    empty = layer(x, token_mask=torch.zeros(2, 7, dtype=torch.bool))
    torch.testing.assert_close(empty.output, shared(x))
    assert all(float(v.detach()) == 0 for v in empty.aux_losses.values())


def test_aux_losses_and_last_state() -> None:
    torch.manual_seed(4)
    layer = MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H))
    x = torch.randn(10, D)
    out = layer(x)
    assert isinstance(out, MoEOutput)
    r = layer.router(x)
    gates = torch.zeros(10, E).scatter_add(1, r.expert_indices_TK, r.combine_weights_TK)
    torch.testing.assert_close(out.aux_losses["load_balance"], load_balancing_loss(r.probs_TE, r.expert_indices_TK))
    torch.testing.assert_close(out.aux_losses["z_loss"], router_z_loss(r.logits_TE))
    torch.testing.assert_close(out.aux_losses["importance"], importance_loss(gates))
    assert layer.last_aux_losses is out.aux_losses and layer.last_stats is out.stats
    model = nn.Sequential(layer)
    assert set(collect_aux_losses(model)) == {"load_balance", "z_loss", "importance"}
    # expert choice: no load-balance loss (every expert is full by construction)
    ec = MoE(ROUTERS["expert_choice"](D, E), ExpertBank(E, D, H))
    assert set(ec(x).aux_losses) == {"z_loss", "importance"}


def test_bf16_input() -> None:
    torch.manual_seed(5)
    layer = MoE(TopKRouter(D, E, top_k=2), ExpertBank(E, D, H))
    x = torch.randn(12, D)
    want = layer(x).output
    layer_bf16 = MoE(layer.router, ExpertBank(E, D, H).to(torch.bfloat16))
    layer_bf16.experts.load_state_dict({k: v.bfloat16() for k, v in layer.experts.state_dict().items()})
    got = layer_bf16(x.bfloat16())
    assert got.output.dtype == torch.bfloat16
    assert layer.router.gate.weight.dtype == torch.float32  # router stays fp32
    torch.testing.assert_close(got.output.float(), want, atol=0.05, rtol=0.05)
    got.output.float().sum().backward()
    assert layer_bf16.experts.w_in.grad.dtype == torch.bfloat16


def test_conv_experts_route_feature_maps() -> None:
    torch.manual_seed(6)
    experts = ConvExperts(E, in_channels=3, out_channels=5, norm=None)
    layer = MoE(SwitchRouter(3, E), experts, capacity_factor=2.0)
    x = torch.randn(2, 3, 3, 4, 4, requires_grad=True)  # (B, N, C, H, W)
    out = layer(x)
    assert out.output.shape == (2, 3, 5, 4, 4)
    x_T = x.reshape(6, 3, 4, 4)
    routing = layer.router(x_T.mean(dim=(-2, -1)))

    def expert_fn(e: int, x_CHW: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.conv2d(x_CHW[None], experts.weight[e], experts.bias[e], padding=1)
        return torch.relu(h)[0]

    ref, _, counts = reference_moe(expert_fn, x_T, routing, layer.capacity(6, 1), E)
    torch.testing.assert_close(out.output, ref.reshape(out.output.shape))
    assert out.stats.tokens_per_expert_E.tolist() == counts
    g_out, g_ref = torch.autograd.grad(out.output.sum(), x), torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_out[0], g_ref[0])
    # explicit router input
    r_in = torch.randn(2, 3, 3)
    torch.testing.assert_close(
        layer(x, router_input=r_in).routing.probs_TE, layer.router(r_in.reshape(6, 3)).probs_TE
    )


def test_module_experts_through_the_layer() -> None:
    torch.manual_seed(7)
    modules = [nn.Linear(D, D) for _ in range(E)]
    layer = MoE(TopKRouter(D, E, top_k=2), ModuleExperts(modules), capacity_factor=0.75)
    x = torch.randn(10, D)
    routing = layer.router(x)
    ref, _, _ = reference_moe(lambda e, r: modules[e](r), x, routing, layer.capacity(10, 2), E)
    torch.testing.assert_close(layer(x).output, ref)


def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(8)
    layer = MoE(TopKRouter(16, E, top_k=2), ExpertBank(E, 16, 32), capacity_factor=1.5)
    x = torch.randn(24, 16)
    eager = layer(x).output
    compiled = torch.compile(layer, fullgraph=False, dynamic=False)
    torch.testing.assert_close(compiled(x).output, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_bf16_layer_without_stats_compiles_to_one_graph(router: str) -> None:
    """The documented break-free path: grouped GEMM experts (16-bit) and ``track_stats=False``."""
    torch.manual_seed(9)
    gate = TopKRouter(64, E, top_k=2) if router == "topk" else ExpertChoiceRouter(64, E)
    layer = MoE(gate, ExpertBank(E, 64, 128).to(torch.bfloat16), capacity_factor=1.25, track_stats=False)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)  # raises on any graph break
    torch.testing.assert_close(compiled(x).output, layer(x).output, atol=2e-2, rtol=2e-2)


def test_compiled_fp32_layer_does_not_recompile_when_the_counts_change() -> None:
    """fp32 on the CPU runs its expert kernel eagerly behind one disabled call: new per-expert
    counts (another batch routes differently) must not trigger a recompile."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(10)
    layer = MoE(TopKRouter(16, E, top_k=2), ExpertBank(E, 16, 32), track_stats=False)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, dynamic=False)
    x1, x2 = torch.randn(40, 16), 3 * torch.randn(40, 16) + 1
    assert layer.router(x1).expert_indices_TK.flatten().bincount(minlength=E).tolist() != \
        layer.router(x2).expert_indices_TK.flatten().bincount(minlength=E).tolist()
    torch.testing.assert_close(compiled(x1).output, layer(x1).output, atol=1e-5, rtol=1e-4)
    frames = counter.frame_count
    out = compiled(x2).output
    torch.testing.assert_close(out, layer(x2).output, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert counter.frame_count == frames


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(TopKRouter(D, E), ExpertBank(E, D, H), capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(TopKRouter(D, E), ExpertBank(E, D, H), capacity_factor=-1.0)
    with pytest.raises(ValueError, match="min_capacity"):
        MoE(TopKRouter(D, E), ExpertBank(E, D, H), min_capacity=0)
    with pytest.raises(ValueError, match="num_experts"):
        MoE(TopKRouter(D, E), ExpertBank(E + 1, D, H))
    with pytest.raises(ValueError, match="d_model"):
        MoE(TopKRouter(D, E), ExpertBank(E, D + 1, H))
    with pytest.raises(ValueError, match="shared_experts"):
        MoE(TopKRouter(D, E), ExpertBank(E, D, H), shared_experts=FFN(D + 2, 4))
    with pytest.raises(ValueError, match="experts"):
        MoE(TopKRouter(D, E), nn.Linear(D, D))
    layer = MoE(TopKRouter(D, E), ExpertBank(E, D, H))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, D), token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, D), token_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="router_input"):
        layer(torch.randn(2, 3, D), router_input=torch.randn(3, D))


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 12),
    num_experts=st.integers(1, 5),
    k=st.integers(1, 3),
    capacity_factor=st.one_of(st.none(), st.floats(0.1, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_property_topk_layer_matches_reference(
    T: int, num_experts: int, k: int, capacity_factor: float | None, seed: int
) -> None:
    k = min(k, num_experts)
    torch.manual_seed(seed)
    layer = MoE(TopKRouter(D, num_experts, top_k=k), ExpertBank(num_experts, D, H), capacity_factor=capacity_factor)
    x = torch.randn(T, D, requires_grad=True)
    out = layer(x)
    routing = layer.router(x)
    C = None if capacity_factor is None else max(1, math.ceil(capacity_factor * T * k / num_experts))
    assert layer.capacity(T, k) == C
    ref, kept, counts = reference_moe(
        lambda e, r: _bank_expert(layer.experts, e, r), x, routing, C, num_experts
    )
    torch.testing.assert_close(out.output, ref)
    assert out.stats.tokens_per_expert_E.tolist() == counts
    assert out.stats.dropped_fraction == pytest.approx(kept.count(False) / len(kept))
    g = torch.autograd.grad(out.output.sum(), [x, layer.experts.w_in, layer.router.gate.weight])
    g_ref = torch.autograd.grad(ref.sum(), [x, layer.experts.w_in, layer.router.gate.weight])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
