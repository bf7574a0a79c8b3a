"""Tests for moe_core.routers / moe_core.expert_choice.

Parametrized contract tests run over every `ROUTERS` entry (the `EXTRA_ARGS` factory must cover
every key, so a new router cannot skip them); reference tests compare each router with an
independent per-token / per-expert Python loop on the same gate weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.routers import (
    ROUTERS,
    GumbelRouter,
    HashRouter,
    HierarchicalRouter,
    SoftmaxRouter,
    SwitchRouter,
    TopKRouter,
)
from moe_core.routing import Routing

D, E, V = 8, 4, 50

EXTRA_ARGS: dict[str, dict] = {
    "softmax": {},
    "gumbel": {"temperature": 0.7},
    "topk": {"top_k": 2, "noisy": True},
    "switch": {"jitter": 0.1},
    "expert_choice": {"capacity_factor": 1.5},
    "hierarchical": {"num_groups": 2, "top_k_groups": 2, "top_k_experts": 1},
    "hash": {"vocab_size": V},
}
# routers whose per-token combine weights sum to 1 (Switch keeps the raw top-1 probability and
# expert choice weights are per expert)
SUMS_TO_ONE = {"softmax", "gumbel", "topk", "hierarchical", "hash"}
NAMES = sorted(ROUTERS)


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ROUTERS[name](D, E, **EXTRA_ARGS[name])


def token_ids_for(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, x.shape[:-1], generator=g)


def route(router: torch.nn.Module, x: torch.Tensor) -> Routing:
    return router(x, token_ids_T=token_ids_for(x))


def test_factory_covers_every_registered_router() -> None:
    assert set(EXTRA_ARGS) == set(ROUTERS)
    assert set(SUMS_TO_ONE) <= set(ROUTERS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(10, D), (2, 5, D)])
def test_output_shapes(name: str, shape: tuple[int, ...]) -> None:
    router = make(name)
    x = torch.randn(*shape)
    routing = route(router, x)
    T = 10
    assert isinstance(routing, Routing)
    assert routing.probs_TE.shape == (T, E) and routing.probs_TE.dtype == torch.float32
    if name == "hash":
        assert routing.logits_TE is None
    else:
        assert routing.logits_TE.shape == (T, E) and routing.logits_TE.dtype == torch.float32
    if name == "expert_choice":
        C = math.ceil(1.5 * T / E)
        assert routing.token_indices_EC.shape == (E, C)
        assert routing.token_indices_EC.dtype == torch.int64
        assert int(routing.token_indices_EC.min()) >= 0 and int(routing.token_indices_EC.max()) < T
    else:
        assert routing.expert_indices_TK.shape == (T, router.top_k)
        assert routing.expert_indices_TK.dtype == torch.int64
        assert routing.combine_weights_TK.dtype == torch.float32
        idx = routing.expert_indices_TK
        assert int(idx.min()) >= 0 and int(idx.max()) < E
        # no expert twice for the same token
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_gate_parameter(name: str) -> None:
    router = make(name).train()
    params = list(router.parameters())
    if name == "hash":
        assert params == []
        return
    x = torch.randn(12, D)
    routing = route(router, x)
    _, _, weight_S = routing.assignments()
    # through the combine weights alone: the task loss must be able to train the router
    (weight_S * torch.linspace(-1.0, 2.0, weight_S.numel())).sum().backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_determinism(name: str) -> None:
    x = torch.randn(3, 4, D)
    a, b = make(name, seed=3).train(), make(name, seed=3).train()
    torch.manual_seed(11)
    ra = route(a, x)
    torch.manual_seed(11)
    rb = route(b, x)
    for ta, tb in zip(ra.assignments(), rb.assignments(), strict=True):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    a.eval()
    r1, r2 = route(a, x), route(a, x)  # no reseeding: eval must not use noise
    for t1, t2 in zip(r1.assignments(), r2.assignments(), strict=True):
        torch.testing.assert_close(t1, t2, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_weights_nonnegative_and_probs_normalized(name: str, training: bool) -> None:
    router = make(name).train(training)
    x = 3.0 * torch.randn(16, D)
    routing = route(router, x)
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(16))
    assert (routing.probs_TE >= 0).all()
    _, _, weight_S = routing.assignments()
    assert (weight_S >= 0).all()
    if name in SUMS_TO_ONE:
        torch.testing.assert_close(routing.combine_weights_TK.sum(-1), torch.ones(16))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_input_gives_float32_logits(name: str) -> None:
    router = make(name).eval()  # eval: no Switch jitter between the two calls
    x = torch.randn(6, D).to(torch.bfloat16)
    routing = route(router, x)
    assert routing.probs_TE.dtype == torch.float32
    if routing.logits_TE is not None:
        assert routing.logits_TE.dtype == torch.float32
        # same logits as the float32 path on the (bf16-rounded) input
        torch.testing.assert_close(routing.logits_TE, route(router, x.float()).logits_TE)
    _, _, weight_S = routing.assignments()
    assert weight_S.dtype == torch.float32
    # even when the whole module was cast to bf16
    assert route(router.to(torch.bfloat16), x).probs_TE.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name: str) -> None:
    router = make(name)
    with pytest.raises(ValueError, match="d_model=8"):
        route(router, torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="floating-point"):
        route(router, torch.ones(4, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_experts"):
        ROUTERS[name](D, 0, **EXTRA_ARGS[name])
    with pytest.raises(ValueError, match="d_model"):
        ROUTERS[name](0, E, **EXTRA_ARGS[name])


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (TopKRouter, {"top_k": E + 1}, r"top_k must be in \[1, 4\]"),
        (TopKRouter, {"top_k": 0}, "top_k"),
        (TopKRouter, {"normalize": "softmax"}, "normalize must be one of.*topk_then_softmax"),
        (TopKRouter, {"noisy": "yes"}, "noisy"),
        (GumbelRouter, {"temperature": 0.0}, "temperature"),
        (GumbelRouter, {"temperature": float("nan")}, "temperature"),
        (SwitchRouter, {"jitter": -0.1}, "jitter"),
        (SwitchRouter, {"jitter": 1.0}, "jitter"),
        (HierarchicalRouter, {"num_groups": 3}, r"num_groups must divide.*\[1, 2, 4\]"),
        (HierarchicalRouter, {"num_groups": 2, "top_k_experts": 3}, "top_k_experts"),
        (HierarchicalRouter, {"num_groups": 2, "top_k_groups": 3}, "top_k_groups"),
        (ExpertChoiceRouter, {"capacity_factor": 0.0}, "capacity_factor"),
        (ExpertChoiceRouter, {"capacity_factor": -1}, "capacity_factor"),
        (HashRouter, {"vocab_size": 0}, "vocab_size"),
    ],
)
def test_bad_options_raise(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(D, E, **kwargs)


def test_hash_router_token_id_errors() -> None:
    router = HashRouter(D, E, vocab_size=V)
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="token_ids_T is required"):
        router(x)
    with pytest.raises(ValueError, match=r"shaped like .*\(2, 3\)"):
        router(x, token_ids_T=torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        router(x, token_ids_T=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[0, vocab_size=50\).*min -1"):
        router(x, token_ids_T=torch.tensor([[0, 1, 2], [3, 4, -1]]))
    with pytest.raises(ValueError, match="max 50"):
        router(x, token_ids_T=torch.tensor([[0, 1, 2], [3, 4, 50]]))


# ---------------------------------------------------------------------------- references


def ref_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.detach().double().t()


def test_softmax_router_matches_dense_softmax() -> None:
    router = SoftmaxRouter(D, E)
    x = torch.randn(5, D)
    routing = router(x)
    expected = ref_logits(x, router.gate.weight).softmax(-1).float()
    torch.testing.assert_close(routing.combine_weights_TK, expected)
    assert routing.expert_indices_TK.tolist() == [list(range(E))] * 5


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(
    ("normalize", "renormalize"),
    [("softmax_then_topk", True), ("softmax_then_topk", False), ("topk_then_softmax", True)],
)
def test_topk_router_matches_per_token_loop(top_k: int, normalize: str, renormalize: bool) -> None:
    torch.manual_seed(1)
    router = TopKRouter(D, 6, top_k=top_k, noisy=True, normalize=normalize, renormalize=renormalize)
    router.eval()  # noisy gating is off in eval
    x = torch.randn(9, D)
    routing = router(x)
    logits = ref_logits(x, router.gate.weight)
    for t in range(9):
        order = torch.sort(logits[t], descending=True).indices[:top_k]
        if normalize == "topk_then_softmax":
            w = torch.exp(logits[t, order] - logits[t, order].max())
            w = w / w.sum()
        else:
            p = torch.exp(logits[t] - logits[t].max())
            w = (p / p.sum())[order]
            if renormalize:
                w = w / w.sum()
        assert routing.expert_indices_TK[t].tolist() == order.tolist()
        torch.testing.assert_close(routing.combine_weights_TK[t], w.float())
    torch.testing.assert_close(routing.probs_TE, logits.softmax(-1).float())


@pytest.mark.parametrize("normalize", ["topk_then_softmax", "softmax_then_topk"])
def test_noisy_topk_uses_softplus_noise_in_training_only(normalize: str) -> None:
    torch.manual_seed(2)
    router = TopKRouter(D, E, top_k=2, noisy=True, normalize=normalize, renormalize=False).train()
    torch.nn.init.normal_(router.noise.weight, std=0.5)
    x = torch.randn(20, D)
    torch.manual_seed(5)
    routing = router(x)
    torch.manual_seed(5)
    noise = torch.randn(20, E).double()
    clean = ref_logits(x, router.gate.weight)
    h = clean + noise * F.softplus(ref_logits(x, router.noise.weight))
    top_h, top_i = h.topk(2, dim=-1)
    assert routing.expert_indices_TK.tolist() == top_i.tolist()
    if normalize == "topk_then_softmax":
        want = top_h.softmax(-1)
    else:  # the noisy logits' softmax over all E, not the clean probs
        want = h.softmax(-1).gather(1, top_i)
        assert not torch.allclose(want, clean.softmax(-1).gather(1, top_i))
    torch.testing.assert_close(routing.combine_weights_TK, want.float())
    torch.testing.assert_close(routing.probs_TE, clean.softmax(-1).float())  # clean probs
    assert not torch.equal(top_i, clean.topk(2, dim=-1).indices)  # the noise did change picks


def test_switch_router_weight_is_raw_top1_probability_and_jitter() -> None:
    torch.manual_seed(3)
    router = SwitchRouter(D, E, jitter=0.2)
    x = torch.randn(30, D)
    probs = ref_logits(x, router.gate.weight).softmax(-1)
    routing = router.eval()(x)  # no jitter in eval
    assert routing.expert_indices_TK[:, 0].tolist() == probs.argmax(-1).tolist()
    torch.testing.assert_close(routing.combine_weights_TK[:, 0], probs.max(-1).values.float())
    router.train()
    torch.manual_seed(7)
    jittered = router(x)
    torch.manual_seed(7)
    u = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(jittered.logits_TE, ref_logits(x * u, router.gate.weight).float())
    assert not torch.allclose(jittered.logits_TE, routing.logits_TE)


@pytest.mark.parametrize(
    ("num_experts", "groups", "kg", "ke"), [(8, 4, 2, 1), (6, 2, 1, 2), (8, 2, 2, 3)]
)
def test_hierarchical_router_matches_per_token_loop(
    num_experts: int, groups: int, kg: int, ke: int
) -> None:
    torch.manual_seed(4)
    router = HierarchicalRouter(
        D, num_experts, num_groups=groups, top_k_groups=kg, top_k_experts=ke
    )
    x = torch.randn(7, D)
    routing = router(x)
    M = num_experts // groups
    group_logits = ref_logits(x, router.group_gate.weight)
    expert_logits = ref_logits(x, router.expert_gate.weight)
    for t in range(7):
        p_group = group_logits[t].softmax(-1)
        dense = []
        for g in range(groups):
            p_in_group = expert_logits[t, g * M : (g + 1) * M].softmax(-1)
            dense += [float(p_group[g] * p_in_group[m]) for m in range(M)]
        torch.testing.assert_close(routing.probs_TE[t], torch.tensor(dense))
        picks = []
        for g in torch.sort(group_logits[t], descending=True).indices[:kg].tolist():
            members = torch.sort(expert_logits[t, g * M : (g + 1) * M], descending=True).indices
            picks += [(dense[g * M + m], g * M + m) for m in members[:ke].tolist()]
        picks.sort(reverse=True)
        total = sum(w for w, _ in picks)
        assert routing.expert_indices_TK[t].tolist() == [e for _, e in picks]
        torch.testing.assert_close(
            routing.combine_weights_TK[t], torch.tensor([w / total for w, _ in picks])
        )


@pytest.mark.parametrize(
    ("T", "num_experts", "cf", "C"),
    [(10, 4, 1.0, 3), (10, 4, 0.5, 2), (6, 3, 100.0, 6), (7, 7, 1.0, 1)],
)
def test_expert_choice_matches_per_expert_loop(T: int, num_experts: int, cf: float, C: int) -> None:
    torch.manual_seed(5)
    router = ExpertChoiceRouter(D, num_experts, capacity_factor=cf)
    assert router.capacity(T) == C
    x = torch.randn(T, D)
    routing = router(x)
    scores = ref_logits(x, router.gate.weight).softmax(-1)
    assert routing.token_indices_EC.shape == (num_experts, C)
    torch.testing.assert_close(routing.probs_TE, scores.float())
    for e in range(num_experts):
        chosen = torch.sort(scores[:, e], descending=True).indices[:C]
        assert sorted(routing.token_indices_EC[e].tolist()) == sorted(chosen.tolist())
        assert len(set(routing.token_indices_EC[e].tolist())) == C
        taken = routing.token_indices_EC[e]
        torch.testing.assert_close(routing.combine_weights_EC[e], scores[taken, e].float())


def test_gumbel_forward_is_one_and_gradient_is_the_soft_samples() -> None:
    torch.manual_seed(6)
    tau = 0.5
    router = GumbelRouter(D, E, temperature=tau).train()
    x = torch.randn(8, D)
    g = -torch.log(-torch.log(torch.rand(8, E, generator=torch.Generator().manual_seed(0))))
    router._gumbel_noise = lambda logits: g  # fixed noise instead of a fresh draw
    c = torch.linspace(0.5, 2.0, 8)
    routing = router(x)
    assert (routing.combine_weights_TK == 1.0).all()  # exactly 1.0 in the forward pass
    (routing.combine_weights_TK[:, 0] * c).sum().backward()

    w_ref = router.gate.weight.detach().clone().requires_grad_(True)
    soft = ((x @ w_ref.t() + g) / tau).softmax(-1)
    choice = (x @ w_ref.detach().t() + g).argmax(-1)
    assert routing.expert_indices_TK[:, 0].tolist() == choice.tolist()
    (soft[torch.arange(8), choice] * c).sum().backward()
    torch.testing.assert_close(router.gate.weight.grad, w_ref.grad)


def test_gumbel_eval_is_argmax_and_training_samples_follow_softmax() -> None:
    torch.manual_seed(7)
    router = GumbelRouter(D, E, temperature=2.0)
    x = torch.randn(1, D).expand(20000, D)
    probs = ref_logits(x[:1], router.gate.weight).softmax(-1)[0]
    routing = router.eval()(x)
    assert (routing.expert_indices_TK == int(probs.argmax())).all()
    assert (routing.combine_weights_TK == 1.0).all()
    counts = torch.bincount(router.train()(x).expert_indices_TK[:, 0], minlength=E)
    # Gumbel-max: the hard sample is distributed as softmax(logits) whatever the temperature
    torch.testing.assert_close(counts.double() / 20000, probs, atol=0.015, rtol=0)


def test_hash_router_table() -> None:
    router = HashRouter(D, E, vocab_size=1000, seed=1)
    assert list(router.parameters()) == [] and "table_V" in router.state_dict()
    assert torch.bincount(router.table_V, minlength=E).tolist() == [250] * E  # balanced table
    ids = torch.tensor([[5, 7, 5], [7, 999, 0]])
    x = torch.randn(2, 3, D)
    routing = router(x, token_ids_T=ids)
    idx = routing.expert_indices_TK[:, 0]
    assert idx[0] == idx[2] and idx[1] == idx[3]  # same id -> same expert
    assert idx.tolist() == router.table_V[ids.reshape(-1)].tolist()
    flat = router(x, token_ids_T=ids.reshape(-1))
    assert torch.equal(flat.expert_indices_TK, routing.expert_indices_TK)
    torch.testing.assert_close(routing.probs_TE, F.one_hot(idx, E).float())
    many = router(torch.randn(400, D), token_ids_T=torch.arange(400)).expert_indices_TK[:, 0]
    assert (torch.bincount(many, minlength=E) > 50).all()  # ids spread over every expert
    same = HashRouter(D, E, vocab_size=1000, seed=1).table_V
    other = HashRouter(D, E, vocab_size=1000, seed=2).table_V
    assert torch.equal(same, router.table_V) and not torch.equal(other, router.table_V)


# ---------------------------------------------------------------------------- property test


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 12),
    num_experts=st.integers(1, 8),
    data=st.data(),
)
def test_topk_router_invariants(T: int, num_experts: int, data: st.DataObject) -> None:
    top_k = data.draw(st.integers(1, num_experts), label="top_k")
    normalize = data.draw(st.sampled_from(["softmax_then_topk", "topk_then_softmax"]))
    renormalize = data.draw(st.booleans(), label="renormalize")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    router = TopKRouter(
        D, num_experts, top_k=top_k, noisy=True, normalize=normalize, renormalize=renormalize
    ).eval()
    routing = router(torch.randn(T, D) * 5)
    idx, w = routing.expert_indices_TK, routing.combine_weights_TK
    assert idx.shape == w.shape == (T, top_k)
    assert ((idx >= 0) & (idx < num_experts)).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
    assert (w >= 0).all() and (w.diff(dim=-1) <= 1e-7).all()  # best first
    sums = w.sum(-1)
    if normalize == "topk_then_softmax" or renormalize:
        torch.testing.assert_close(sums, torch.ones(T))
    else:
        assert (sums <= 1 + 1e-6).all()
        torch.testing.assert_close(w, routing.probs_TE.gather(1, idx))
    chosen_min = routing.logits_TE.gather(1, idx).min(-1).values
    unchosen = routing.logits_TE.scatter(1, idx, float("-inf")).max(-1).values
    assert (chosen_min >= unchosen).all()
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(T))
