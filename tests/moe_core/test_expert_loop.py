"""The fused per-expert kernel (`moe_core.expert_loop`) against a plain per-slot Python loop:
every subset of inputs that needs a gradient, inference without saved activations, relu."""

from __future__ import annotations

import itertools

import pytest
import torch
from moe_core_references import reference_activation

from moe_core.expert_loop import expert_blocks, expert_loop_ffn_combine


def test_expert_blocks_skip_empty_experts() -> None:
    assert expert_blocks([2, 0, 3, 0]) == [(0, 0, 2), (2, 2, 5)]
    assert expert_blocks([0, 0]) == []


def _reference(x, token_S, weight_S, expert_S, w_in, w_out, b_in, b_out, activation):
    out = torch.zeros(x.shape[0], w_out.shape[-1])
    for s in range(token_S.shape[0]):
        t, e = int(token_S[s]), int(expert_S[s])
        h = x[t] @ w_in[e] + b_in[e]
        out[t] = out[t] + weight_S[s] * (reference_activation(h, activation) @ w_out[e] + b_out[e])
    return out


def _problem(activation: str):
    gen = torch.Generator().manual_seed(0)
    T, E, D, H = 7, 4, 6, 5
    width = 2 * H if activation == "swiglu" else H
    params = {
        "x": torch.randn(T, D, generator=gen),
        "weight": torch.rand(10, generator=gen),
        "w_in": torch.randn(E, D, width, generator=gen),
        "w_out": torch.randn(E, H, D, generator=gen),
        "b_in": torch.randn(E, width, generator=gen),
        "b_out": torch.randn(E, D, generator=gen),
    }
    counts = [3, 0, 4, 1]  # expert 1 is empty, the last 2 slots are dropped
    expert_S = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3])
    token_S = torch.tensor([0, 3, 5, 1, 2, 3, 6, 0, 4, 2])
    return params, counts, expert_S, token_S


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("needs", [("x",), ("weight",), ("w_in", "b_out"), ("w_out", "b_in"), ()])
def test_loop_kernel_gradients_of_any_subset(activation: str, needs: tuple[str, ...]) -> None:
    params, counts, expert_S, token_S = _problem(activation)
    for name in needs:
        params[name].requires_grad_(True)
    p = params
    out = expert_loop_ffn_combine(
        p["x"], token_S, p["weight"], counts, p["w_in"], p["w_out"], p["b_in"], p["b_out"], activation
    )
    kept = sum(counts)
    ref = _reference(p["x"], token_S[:kept], p["weight"][:kept], expert_S, p["w_in"], p["w_out"],
                     p["b_in"], p["b_out"], activation)
    torch.testing.assert_close(out, ref)
    if not needs:
        assert not out.requires_grad
        return
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    inputs = [params[n] for n in needs]
    got = torch.autograd.grad(out, inputs, gy)
    want = torch.autograd.grad(ref, inputs, gy)
    for name, a, b in zip(needs, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    if "weight" in needs:  # dropped slots get exactly zero
        assert got[needs.index("weight")][kept:].abs().max() == 0
    if "w_in" in needs:  # so does the expert without rows
        assert got[needs.index("w_in")][1].abs().max() == 0


def test_inference_matches_training_output() -> None:
    """Under no_grad (even with parameters that require grad) the kernel builds no graph; with
    grad it saves the (rows, H) pre-activation, and both give the same output."""
    params, counts, _, token_S = _problem("gelu")
    params["w_in"].requires_grad_(True)
    args = [params[n] for n in ("x", "weight")], [params[n] for n in ("w_in", "w_out", "b_in", "b_out")]
    with torch.no_grad():
        infer = expert_loop_ffn_combine(args[0][0], token_S, args[0][1], counts, *args[1], "gelu")
    train = expert_loop_ffn_combine(args[0][0], token_S, args[0][1], counts, *args[1], "gelu")
    torch.testing.assert_close(infer, train.detach(), rtol=0, atol=0)
    assert infer.grad_fn is None
    assert (sum(counts), params["w_in"].shape[2]) in [tuple(t.shape) for t in train.grad_fn.saved_tensors]


def test_backward_twice_with_retain_graph() -> None:
    """Nothing saved is overwritten in place: a second backward gives the same gradients."""
    params, counts, _, token_S = _problem("gelu")
    for t in params.values():
        t.requires_grad_(True)
    p = params
    out = expert_loop_ffn_combine(
        p["x"], token_S, p["weight"], counts, p["w_in"], p["w_out"], p["b_in"], p["b_out"], "gelu"
    )
    first = torch.autograd.grad(out.square().sum(), list(p.values()), retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), list(p.values()))
    for a, b in itertools.zip_longest(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
