"""The expert FFN and weighted combine one expert at a time, fused, with a hand-written backward.

The ``loop`` kernel of `moe_core.kernels.expert_ffn_combine` (the ``auto`` choice for fp32 on the
CPU).
Slots are sorted by expert (MegaBlocks' dropless layout, Gale et al. 2022); for each expert in turn
its rows are gathered, pushed through ``act(x W_in + b_in) W_out + b_out``, scaled by their
combine weights and added into their tokens' outputs while they are still in cache.

Why a loop beats one big grouped GEMM on the CPU (docs/BENCHMARKS.md): there is no GPU launch
cost to amortise, the GEMMs are the same (``torch._grouped_mm`` loops over the experts on the CPU
too), and every row-sized temporary (the activation, the weighted output, the gradients of both)
stays the size of one expert's block instead of ``T * K`` rows. Large fresh tensors cost page
faults on every step (the allocator returns them to the OS); here the only ``T * K``-row tensor is
the saved pre-activation, which the backward needs anyway.

Saved for backward: the pre-activation ``h_RH`` and the input ``x_TD`` (the rows are gathered
again per expert rather than kept); the activation is recomputed per expert. Both the forward
combine and the input gradient are one ``index_add_`` per expert into ``(T, D)``: a token appears
at most once in an expert's block, and the experts run in order, so the sums are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_core.activations import activation_backward, apply_activation


def expert_blocks(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of each non-empty block of sorted rows, from per-expert counts."""
    blocks, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            blocks.append((expert, start, start + count))
        start += count
    return blocks


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    return torch.mm(x, w, out=out) if b is None else torch.addmm(b, x, w, out=out)


class _Workspace:
    """Row buffers sized for the largest expert block, reused by every block of one call: the
    per-block temporaries then cost no allocation (and no page faults) however many experts."""

    def __init__(self, like: Tensor, rows: int, **widths: int) -> None:
        self.buffers = {name: like.new_empty(rows, width) for name, width in widths.items()}

    def __call__(self, name: str, n: int) -> Tensor:
        return self.buffers[name][:n]


class _ExpertLoopFFNCombine(torch.autograd.Function):
    """``out[t] = sum_s weight_S[s] * ffn_{e(s)}(x[token_S[s]])``, one expert block at a time."""

    @staticmethod
    def forward(ctx, x_TD, weight_S, w_in, w_out, b_in, b_out, token_S, blocks, activation, training):  # type: ignore[override]
        D, H_in, H, D_out = w_in.shape[1], w_in.shape[2], w_out.shape[1], w_out.shape[2]
        out_TD = x_TD.new_zeros(x_TD.shape[0], D_out)
        largest = max((end - start for _, start, end in blocks), default=0)
        h_RH = x_TD.new_empty(blocks[-1][2] if blocks else 0, H_in) if training else None
        ws = _Workspace(x_TD, largest, x=D, h=0 if training else H_in, a=H, y=D_out)
        for e, start, end in blocks:
            n, token_n = end - start, token_S[start:end]
            x_n = torch.index_select(x_TD, 0, token_n, out=ws("x", n))
            h = _linear(x_n, w_in[e], None if b_in is None else b_in[e],
                        out=ws("h", n) if h_RH is None else h_RH[start:end])
            a = apply_activation(h, activation, out=ws("a", n))
            y = _linear(a, w_out[e], None if b_out is None else b_out[e], out=ws("y", n))
            out_TD.index_add_(0, token_n, y.mul_(weight_S[start:end].unsqueeze(1)))
        ctx.save_for_backward(x_TD, weight_S, w_in, w_out, b_in, b_out, token_S, h_RH)
        ctx.blocks, ctx.activation, ctx.largest = blocks, activation, largest
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):  # type: ignore[override]
        x_TD, weight_S, w_in, w_out, b_in, b_out, token_S, h_RH = ctx.saved_tensors
        need_x, need_weight, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        blocks, activation = ctx.blocks, ctx.activation
        D, H_in, H, D_out = w_in.shape[1], w_in.shape[2], w_out.shape[1], w_out.shape[2]
        grad_out_TD = grad_out_TD.contiguous()
        grad_x = torch.zeros_like(x_TD) if need_x else None
        grad_weight = torch.zeros_like(weight_S) if need_weight else None
        # experts without rows get zero gradients; the others are written whole by one mm each
        grads = [
            _block_grad_buffer(param, blocks) if need else None
            for param, need in ((w_in, need_w_in), (w_out, need_w_out), (b_in, need_b_in), (b_out, need_b_out))
        ]
        grad_w_in, grad_w_out, grad_b_in, grad_b_out = grads
        # gelu / relu write their gradient over grad_a; swiglu's is twice as wide
        ws = _Workspace(x_TD, ctx.largest, x=D, g=D_out, grad_a=H, a=H,
                        grad_h=H_in if activation == "swiglu" else 0)
        for e, start, end in blocks:
            n, token_n = end - start, token_S[start:end]
            weight_n1 = weight_S[start:end].unsqueeze(1)
            h = h_RH[start:end]
            g = torch.index_select(grad_out_TD, 0, token_n, out=ws("g", n))  # dL/dy before weighting
            grad_a = torch.mm(g, w_out[e].t(), out=ws("grad_a", n))
            a = apply_activation(h, activation, out=ws("a", n))
            if need_weight:  # dL/dweight = <g, y> = <g W_out^T, a> + <g, b_out>, row by row
                dot = torch.bmm(a.unsqueeze(1), grad_a.unsqueeze(2), out=grad_weight[start:end].view(n, 1, 1))
                if b_out is not None:
                    dot.view(n).addmv_(g, b_out[e])
            g.mul_(weight_n1)
            if grad_w_out is not None:
                torch.mm(a.t(), g, out=grad_w_out[e])
            if grad_b_out is not None:
                torch.sum(g, 0, out=grad_b_out[e])
            grad_h = activation_backward(
                grad_a.mul_(weight_n1), h, activation,
                out=ws("grad_h", n) if activation == "swiglu" else grad_a,
            )
            x_n = ws("x", n)
            if grad_w_in is not None:
                torch.mm(torch.index_select(x_TD, 0, token_n, out=x_n).t(), grad_h, out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(grad_h, 0, out=grad_b_in[e])
            if grad_x is not None:
                grad_x.index_add_(0, token_n, torch.mm(grad_h, w_in[e].t(), out=x_n))
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None, None


def _block_grad_buffer(param: Tensor | None, blocks: list[tuple[int, int, int]]) -> Tensor | None:
    """An uninitialised gradient for ``param`` (E, ...) with the experts that have no rows zeroed."""
    if param is None:
        return None
    grad = torch.empty_like(param, memory_format=torch.contiguous_format)
    busy = {e for e, _, _ in blocks}
    for e in range(param.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad


def expert_loop_ffn_combine(
    x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts: list[int],
    w_in: Tensor, w_out: Tensor, b_in: Tensor | None, b_out: Tensor | None, activation: str,
) -> Tensor:
    """``(T, D_out)``: sum over each token's sorted slots of weight * expert FFN (see the module
    docstring). ``counts``: host list of rows per expert, in order; slots past their sum
    (dropped by capacity) are skipped and get a zero weight gradient. Without autograd (no
    input needs a gradient, or grad mode is off) the pre-activation is not kept."""
    inputs = (x_TD, weight_S, w_in, w_out, b_in, b_out)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _ExpertLoopFFNCombine.apply(*inputs, token_S, expert_blocks(counts), activation, training)
