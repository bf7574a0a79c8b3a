"""The fused expert FFN: the kernel choice as a table (every case written down from the measured
rules), the dispatch through `KERNELS`, and every kernel against a plain per-slot loop."""

from __future__ import annotations

import itertools

import pytest
import torch
from moe_core_references import reference_activation

from moe_core import expert_layouts
from moe_core.dispatch import dispatch_combine, sort_slots
from moe_core.expert_choice import ExpertChoiceRouter
from moe_core.expert_layouts import tier_plan
from moe_core.experts import ExpertBank
from moe_core.kernels import (
    KERNELS,
    METHODS,
    choose_kernel,
    expert_ffn_combine,
    grouped_mm_supported,
)
from moe_core.layer import MoE
from moe_core.routers import TopKRouter


def _ffn(w_in, w_out, b_in, b_out, e, x, activation):
    h = x @ w_in[e] + (0 if b_in is None else b_in[e])
    return reference_activation(h, activation) @ w_out[e] + (0 if b_out is None else b_out[e])


def _reference(x_TD, token_S, expert_S, weight_S, keep_S, params, activation):
    out = torch.zeros(x_TD.shape[0], params[1].shape[-1])
    rows = [[] for _ in range(x_TD.shape[0])]
    for s in range(token_S.shape[0]):
        if keep_S[s]:
            t, e = int(token_S[s]), int(expert_S[s])
            rows[t].append(weight_S[s] * _ffn(*params, e, x_TD[t], activation))
    return torch.stack([sum(r, torch.zeros_like(out[0])) for r in rows])


@pytest.mark.parametrize("method", ["auto", "padded", "bucketed", "grouped", "loop"])
@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gather_plan", [False, True])
def test_fused_expert_ffn_combine_matches_loop(
    method: str, capacity: int | None, activation: str, bias: bool, gather_plan: bool,
    many_tiers: None,
) -> None:
    torch.manual_seed(0)
    T, E_, D_, H_ = 9, 4, 8, 4
    width = 2 * H_ if activation == "swiglu" else H_
    w_in = torch.randn(E_, D_, width, requires_grad=True)
    w_out = torch.randn(E_, H_, D_, requires_grad=True)
    b_in = torch.randn(E_, width, requires_grad=True) if bias else None
    b_out = torch.randn(E_, D_, requires_grad=True) if bias else None
    x = torch.randn(T, D_, requires_grad=True)
    token_S = torch.arange(T).repeat(2)
    expert_S = torch.randint(0, E_ - 1, (2 * T,))  # the last expert gets nothing
    weight_S = torch.rand(2 * T, requires_grad=True)
    slots = sort_slots(expert_S, E_, capacity)
    slot_KT = None
    if gather_plan:  # token t's slots are t and T + t; where did the sort put them?
        slot_KT = torch.argsort(slots.order_S).view(2, T)
    out = expert_ffn_combine(
        x, token_S[slots.order_S], weight_S[slots.order_S], slots.counts_E,
        w_in, w_out, b_in, b_out, activation, method, slot_KT,
    )
    params = (w_in, w_out, b_in, b_out)
    ref = _reference(x, token_S, expert_S, weight_S, slots.kept_S, params, activation)
    torch.testing.assert_close(out, ref)
    inputs = [x, weight_S, *(p for p in params if p is not None)]
    gy = torch.randn(out.shape)
    got = torch.autograd.grad(out, inputs, gy, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, gy, retain_graph=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a zero-stride incoming gradient (from .sum()) is fine too
    got, want = torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_kernels() -> None:
    torch.manual_seed(3)
    bank32 = ExpertBank(4, 16, 32)
    x = torch.randn(20, 16)
    token_S, expert_S, weight_S = torch.arange(20).repeat(2), torch.randint(0, 4, (40,)), torch.rand(40)
    want = dispatch_combine(x, token_S, expert_S, weight_S, bank32).output
    for method in ("padded", "bucketed", "grouped", "loop"):
        bank = ExpertBank(4, 16, 32, method=method).to(torch.bfloat16)
        bank.load_state_dict(bank32.state_dict())
        got = dispatch_combine(x.bfloat16(), token_S, expert_S, weight_S, bank).output
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def _brute_force_tier_cost(counts: list[int]) -> float:
    """Cheapest split of the experts sorted by count into at most MAX_TIERS buckets, each padded
    to its own largest count, every split tried; tier costs as `tier_plan` documents them."""
    c, E, best = sorted(counts, reverse=True), len(counts), float("inf")
    for m in range(1, expert_layouts.MAX_TIERS + 1):
        for cuts in itertools.combinations(range(1, E), m - 1):
            bounds = [0, *cuts, E]
            cost = 0.0
            for i, j in itertools.pairwise(bounds):  # bucket [i, j) ends the tier of the first j
                cost += (j - i) * c[i] + expert_layouts.TIER_LEVEL_ROWS * j
                tier = expert_layouts.TIER_COPY_ROWS * j + expert_layouts.TIER_FIXED_ROWS
                cost += tier if j < E else 0
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_tier_plan_is_the_cheapest_split(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 8, (1,), generator=gen))
    counts = torch.randint(0, 120, (E,), generator=gen).tolist()
    if seed == 0:
        counts = [100, 3, 3, 90, 40, 0, 41]  # ties and an empty expert
        E = len(counts)
    tiers = tier_plan(counts)
    # shape: tier 1 is every expert from row 0; each tier starts where the last ended and holds
    # at least the experts with rows there; the top tier ends at the largest count
    assert tiers[0][0] == list(range(E)) and tiers[0][1] == 0
    assert tiers[-1][2] == max(counts)
    cost = 0.0
    for k, (experts, lo, hi) in enumerate(tiers):
        if k > 0:
            assert lo == tiers[k - 1][2] and hi > lo
        assert {e for e in range(E) if counts[e] > lo} <= set(experts)
        cost += len(experts) * (hi - lo + expert_layouts.TIER_LEVEL_ROWS)
        tier = expert_layouts.TIER_COPY_ROWS * len(experts) + expert_layouts.TIER_FIXED_ROWS
        cost += tier if k > 0 else 0
    assert cost == _brute_force_tier_cost(counts)


F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
UNEVEN, EQUAL, EMPTY, SKEWED = [3, 1, 0, 5], [4, 4, 4, 4], [0, 0, 0], [32] + [0] * 7
TWO_TIERS = [2000] * 4 + [1000] * 4  # one tier pads to 16000 rows (1.33x), two tiers pad none

# (device, dtype, compiling, counts, grouped_ok) -> the kernel ``auto`` runs; written down from
# the measured rules (docs/BENCHMARKS.md) before the choice became a table
CHOICES = [
    # fp32 / fp64 on the CPU: the per-expert loop, one bmm for equal blocks, eager under compile
    ("cpu", F32, False, UNEVEN, False, "loop"),
    ("cpu", F32, False, UNEVEN, True, "loop"),  # even where grouped GEMM would run
    ("cpu", F32, False, EQUAL, True, "padded"),
    ("cpu", F32, False, EMPTY, False, "padded"),
    ("cpu", F32, False, SKEWED, False, "loop"),
    ("cpu", F32, False, TWO_TIERS, False, "loop"),
    ("cpu", F64, False, UNEVEN, False, "loop"),
    ("cpu", F64, False, EQUAL, False, "padded"),
    ("cpu", F32, True, UNEVEN, False, "eager"),
    ("cpu", F32, True, EQUAL, False, "eager"),
    # 16-bit floats on the CPU: grouped GEMM where the widths allow it, compiled or not
    ("cpu", BF16, False, UNEVEN, True, "grouped"),
    ("cpu", BF16, False, EQUAL, True, "grouped"),
    ("cpu", F16, True, SKEWED, True, "grouped"),
    # ... else padding in tiers within PAD_LIMIT, else the loop
    ("cpu", BF16, False, UNEVEN, False, "loop"),
    ("cpu", BF16, False, EQUAL, False, "padded"),
    ("cpu", BF16, False, EMPTY, False, "padded"),
    ("cpu", BF16, False, SKEWED, False, "loop"),
    ("cpu", BF16, False, TWO_TIERS, False, "bucketed"),
    ("cpu", F16, True, TWO_TIERS, False, "bucketed"),
    # off the CPU: grouped GEMM where supported (CUDA bf16 on sm90+), else one padded tier or loop
    ("cuda", BF16, False, UNEVEN, True, "grouped"),
    ("cuda", BF16, True, SKEWED, True, "grouped"),
    ("cuda", F32, False, UNEVEN, False, "loop"),
    ("cuda", F32, True, EQUAL, False, "padded"),
    ("cuda", F32, False, EMPTY, False, "padded"),
    ("cuda", F32, False, SKEWED, False, "loop"),
    ("cuda", F16, False, TWO_TIERS, False, "padded"),  # no tiers off the CPU
]


@pytest.mark.parametrize(("device", "dtype", "compiling", "counts", "grouped_ok", "kernel"), CHOICES)
def test_auto_kernel_choice(device, dtype, compiling, counts, grouped_ok, kernel) -> None:
    assert choose_kernel(device, dtype, compiling, counts, grouped_ok=grouped_ok) == kernel
    assert kernel in KERNELS


class _Unread:
    """Counts that fail when read: a choice that needs no counts must not touch them."""

    def __len__(self) -> int:
        return 4

    def __iter__(self):
        raise AssertionError("the counts were read")

    __getitem__ = __iter__


def test_choice_reads_no_counts_for_grouped_or_eager() -> None:
    assert choose_kernel("cuda", BF16, False, _Unread(), grouped_ok=True) == "grouped"
    assert choose_kernel("cpu", BF16, True, _Unread(), grouped_ok=True) == "grouped"
    assert choose_kernel("cpu", F32, True, _Unread(), grouped_ok=False) == "eager"
    for method in ("loop", "padded", "bucketed", "grouped"):
        assert choose_kernel("cuda", F32, True, _Unread(), grouped_ok=True, method=method) == method


def test_forced_methods_and_errors() -> None:
    assert set(METHODS) == {"auto"} | (set(KERNELS) - {"eager"})
    for method in ("loop", "padded", "bucketed"):
        assert choose_kernel("cpu", BF16, False, UNEVEN, grouped_ok=False, method=method) == method
    with pytest.raises(ValueError, match=r"method='grouped' needs .* multiples of 8"):
        choose_kernel("cpu", BF16, False, UNEVEN, grouped_ok=False, method="grouped")
    with pytest.raises(ValueError, match="method must be one of"):
        choose_kernel("cpu", F32, False, UNEVEN, grouped_ok=True, method="fast")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_beyond_the_slots_are_refused_by_every_kernel(method, dtype) -> None:
    """Eager on the CPU the counts are read and checked before any kernel runs, whichever it is."""
    E, D, H, T = 4, 8, 16, 5
    x_TD = torch.randn(T, D, dtype=dtype)
    w_in, w_out = torch.randn(E, D, H, dtype=dtype), torch.randn(E, H, D, dtype=dtype)
    if method == "grouped" and not grouped_mm_supported(x_TD, D, H):
        pytest.skip("no grouped GEMM for this dtype here")
    with pytest.raises(ValueError, match="counts_E sums to 12 but there are only 5 slots"):
        expert_ffn_combine(x_TD, torch.arange(T), torch.ones(T), torch.tensor([3, 3, 3, 3]),
                           w_in, w_out, None, None, "gelu", method)


@pytest.fixture
def kernels_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every kernel of `KERNELS` records its name when the dispatch calls it."""
    used: list[str] = []
    for name, kernel in list(KERNELS.items()):
        monkeypatch.setitem(KERNELS, name, lambda *a, _n=name, _k=kernel: used.append(_n) or _k(*a))
    return used


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("d_model", [16, 6])  # 6: bf16 rows of 12 bytes, no grouped GEMM
@pytest.mark.parametrize("counts", [UNEVEN, EQUAL, [12, 0, 0, 0]])
def test_dispatch_runs_the_chosen_kernel(dtype, d_model, counts, kernels_used: list[str]) -> None:
    torch.manual_seed(0)
    E_, S = len(counts), sum(counts)
    x, weight_S = torch.randn(S, d_model, dtype=dtype), torch.rand(S)
    w_in, w_out = torch.randn(E_, d_model, 16, dtype=dtype), torch.randn(E_, 16, d_model, dtype=dtype)
    out = expert_ffn_combine(x, torch.arange(S), weight_S, torch.tensor(counts), w_in, w_out,
                             None, None, "gelu")
    ok = grouped_mm_supported(x, d_model, 16, 16, d_model)
    assert kernels_used == [choose_kernel("cpu", dtype, False, counts, grouped_ok=ok)]
    expert_S = torch.repeat_interleave(torch.arange(E_), torch.tensor(counts))
    want = torch.stack([  # token t is slot t
        weight_S[t] * reference_activation(x[t].float() @ w_in[e].float(), "gelu") @ w_out[e].float()
        for t, e in enumerate(expert_S.tolist())
    ])
    torch.testing.assert_close(out.float(), want, atol=0.2 if dtype == BF16 else 1e-4, rtol=0.05)


def test_auto_pads_within_pad_limit_else_loops(kernels_used: list[str]) -> None:
    """Where grouped GEMM is unsupported (bf16 rows of 12 bytes, not 16-byte aligned), ``auto``
    pads only while the padded rows stay within PAD_LIMIT x the real rows."""
    torch.manual_seed(2)
    bank = ExpertBank(8, 6, 16).to(torch.bfloat16)
    x = torch.randn(32, 6, dtype=torch.bfloat16)
    even = torch.arange(32) % 8  # 4 rows per expert: no padding at all
    skewed = torch.full((32,), 3)  # one expert: padding to 32 rows would be 8x the real rows
    for expert_S in (even, skewed):
        weight_S = torch.rand(32)
        got = dispatch_combine(x, torch.arange(32), expert_S, weight_S, bank).output
        want = torch.stack([
            weight_S[t] * (torch.nn.functional.gelu(x[t].float() @ bank.w_in[e].float())
                           @ bank.w_out[e].float())
            for t, e in enumerate(expert_S.tolist())
        ])
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    assert kernels_used == ["padded", "loop"]


def test_auto_on_cpu_loops_over_uneven_blocks_and_batches_expert_choice(
    kernels_used: list[str],
) -> None:
    """Token choice (uneven blocks) takes the per-expert kernel; expert choice (every expert the
    same C rows) takes one batched ``bmm`` per matrix, with no Python loop over the experts."""
    torch.manual_seed(4)
    x = torch.randn(64, 16)
    MoE(TopKRouter(16, 8, top_k=2), ExpertBank(8, 16, 32))(x).output.sum().backward()
    MoE(ExpertChoiceRouter(16, 8, capacity_factor=1.0), ExpertBank(8, 16, 32))(x).output.sum().backward()
    assert kernels_used == ["loop", "padded"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "loop"])
def test_every_kernel_runs_under_cpu_bf16_autocast(method: str) -> None:
    """Under bf16 autocast (how the apps train on the CPU) every kernel computes in its inputs'
    dtype, so outputs and gradients equal the ``loop`` kernel's (itself checked against a per-slot
    loop above). ``padded`` used to fail there: its first ``bmm`` turned 16-bit under autocast and
    the ``out=`` GEMM after it refused the mix."""

    def run(kernel: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = MoE(router=TopKRouter(32, 4, top_k=2), experts=ExpertBank(4, 32, 64, method=kernel))
        x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x).output
        y.float().pow(2).sum().backward()
        return [y.float(), x.grad, layer.experts.w_in.grad, layer.experts.w_out.grad]

    for got, want in zip(run(method), run("loop"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
