"""The fused expert FFN: one table of kernels, and the pure choice among them.

`expert_ffn_combine` computes ``out[t] = sum_s weight_S[s] * ffn_{e(s)}(x_TD[token_S[s]])`` over
slots already sorted by expert (MegaBlocks' dropless layout, Gale et al. 2022): the gather, the
expert FFN and the weighted combine are one autograd node with a hand-written backward. It asks
`choose_kernel` -- a pure function of the device, the dtype, whether ``torch.compile`` is tracing,
the rows per expert and whether grouped GEMM runs here -- for a name, and calls ``KERNELS[name]``;
every kernel takes the same arguments (`Kernel`), the way Hugging Face transformers keeps its MoE
expert implementations (``grouped_mm``, ``batched_mm``, ...) in one table.

The kernels:

- ``loop``: one expert block at a time, every temporary the size of one block
  (`moe_core.expert_loop`);
- ``padded``: every expert's rows padded to the busiest expert's, one ``bmm`` per matrix (no
  padding at all for equal blocks, as expert choice gives);
- ``bucketed``: the experts padded in a few tiers of rows (`moe_core.expert_layouts.tier_plan`),
  one ``bmm`` per tier (less padding when routing is uneven);
- ``grouped``: ``torch._grouped_mm`` over the sorted rows (no padding; no host sync off the CPU or
  under ``torch.compile``, so it traces without a graph break);
- ``eager``: ``auto`` run outside the compiled graph in one ``torch.compiler.disable``d call --
  fp32 on the CPU has no traceable kernel (``torch._grouped_mm`` takes 16-bit floats only there)
  and its choice reads the counts on the host: one graph break instead of a recompile for every
  new count.

``auto``, chosen by measurement (docs/BENCHMARKS.md): fp32 (and fp64) on the CPU runs ``loop`` in
eager mode (2 cores, k=2: 0.97-1.0 / 0.85-0.91 / 0.55-0.68x the dense-equivalent FFN at E = 8 / 32
/ 128, against 0.92 / 0.84 / 0.69x for ``grouped`` in the same run), except that equal blocks run
``padded``, and ``eager`` under ``torch.compile``; elsewhere ``grouped`` where grouped GEMM is
supported (CPU 16-bit floats, where it beat ``loop`` in bf16; CUDA bf16 on sm90+); else
``bucketed`` on the CPU (``padded`` where `tier_plan` finds one tier best; off the CPU always one
tier, ``padded``) while the padding stays within `PAD_LIMIT` x the real rows, else ``loop``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from moe_core.activations import activation_backward, apply_activation
from moe_core.dispatch import combine_rows
from moe_core.expert_layouts import _Bucketed, _Grouped, _Padded, tier_plan
from moe_core.expert_loop import expert_loop_ffn_combine

METHODS = ("auto", "padded", "bucketed", "grouped", "loop")
"""What ``ExpertBank(method=...)`` accepts: ``auto`` (`choose_kernel`) or one kernel by name."""
PAD_LIMIT = 1.5
"""Where grouped GEMM is unsupported, ``auto`` pads experts (to one row count or in tiers) only
while padded rows <= PAD_LIMIT x real, else it loops over the experts."""


class _ExpertFFNCombine(torch.autograd.Function):
    """``out[t] = sum_s weight_S[s] * ffn_{e(s)}(x[token_S[s]])`` as one autograd node.

    Forward keeps the gathered input and the pre-activation only (the activation is recomputed in
    backward, as a fused MLP would). The combine-weight gradient ``<g_t, y_s>`` is taken as
    ``<g_t @ w_out^T, a_s> + <g_t, b_out>``, so expert outputs are never stored.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_R, w_in, w_out, b_in, b_out, layout, activation, rows_KT):  # type: ignore[override]
        x_R = layout.rows(x_TD.index_select(0, layout.token_R))
        h = layout.mm(x_R, w_in, b_in)
        y_flat = layout.mm_flat(apply_activation(h, activation), w_out)
        R = weight_R.shape[0]
        if b_out is not None:
            y_flat[:R].add_(layout.flat(layout.expert_rows(b_out).expand(*h.shape[:-1], -1)))
            if layout.valid_R1 is not None:
                y_flat.masked_fill_(~layout.valid_R1, 0)
        y_flat[:R].mul_(weight_R.unsqueeze(1))
        out = combine_rows(y_flat, layout.token_R, rows_KT, x_TD.shape[0])
        ctx.save_for_backward(x_R, h, weight_R, w_in, w_out, b_out)
        ctx.layout, ctx.activation, ctx.rows_KT = layout, activation, rows_KT
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_R, h, weight_R, w_in, w_out, b_out = ctx.saved_tensors
        layout, activation = ctx.layout, ctx.activation
        need_x, need_weight, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        R = weight_R.shape[0]
        g_flat = layout.gather_flat(grad_out)  # dL/dy per row, before the combine weight
        g = layout.rows(g_flat[:R])
        grad_a = layout.mm(g, w_out.transpose(1, 2))
        a = apply_activation(h, activation)
        bias_dot = None
        if need_weight and b_out is not None:
            bias_dot = torch.linalg.vecdot(g, layout.expert_rows(b_out))
        g.mul_(layout.rows(weight_R.unsqueeze(1)))
        grad_w_out = layout.wgrad(a, g) if need_w_out else None
        grad_b_out = layout.bgrad(g) if need_b_out else None
        del g
        grad_weight = None
        if need_weight:
            grad_weight_R = a.mul_(grad_a).sum(-1)  # a is not needed any more
            if bias_dot is not None:
                grad_weight_R += bias_dot
            grad_weight = grad_weight_R.reshape(-1)
            if layout.valid_R1 is not None:
                grad_weight = grad_weight.masked_fill(~layout.valid_R1.squeeze(1), 0)
        grad_a.mul_(layout.rows(weight_R.unsqueeze(1)))
        grad_h = activation_backward(grad_a, h, activation, out=a if activation != "swiglu" else None)
        del a, grad_a
        grad_w_in = layout.wgrad(x_R, grad_h) if need_w_in else None
        grad_b_in = layout.bgrad(grad_h) if need_b_in else None
        grad_x = None
        if need_x:
            grad_x_flat = layout.mm_flat(grad_h, w_in.transpose(1, 2), buf=g_flat)
            grad_x = combine_rows(grad_x_flat, layout.token_R, ctx.rows_KT, grad_out.shape[0])
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None



def grouped_mm_supported(x: Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` takes rows of these widths on this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all((w * x.element_size()) % 16 == 0 for w in widths)
    if x.device.type == "cpu":  # the fake-tensor (compile) rule of torch 2.14 wants 16-bit floats
        return aligned and (x.dtype != torch.float32 or not torch.compiler.is_compiling())
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        return aligned and x.dtype == torch.bfloat16 and capability >= (9, 0)
    return False


def choose_kernel(
    device: torch.device | str,
    dtype: torch.dtype,
    compiling: bool,
    counts: Sequence[int],
    *,
    grouped_ok: bool,
    method: str = "auto",
) -> str:
    """The name in `KERNELS` that computes the expert FFN (see the module docstring for why).

    Args:
        device: where the rows are (only its type matters: ``"cpu"``, ``"cuda"``, ...).
        dtype: the rows' dtype.
        compiling: whether ``torch.compile`` is tracing the call.
        counts: rows per expert, in expert order; read only when the choice depends on them (the
            dispatch passes them lazily, so a choice that does not read them costs no host sync).
        grouped_ok: whether ``torch._grouped_mm`` takes these rows here (`grouped_mm_supported`).
        method: ``"auto"``, or a kernel forced by name (returned as is once checked).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "grouped" and not grouped_ok:
        raise ValueError(
            "method='grouped' needs torch._grouped_mm with 16-byte aligned rows on this device "
            f"(d_model/d_hidden multiples of {16 // dtype.itemsize}); use 'padded' or 'loop'"
        )
    if method != "auto":
        return method
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and dtype.itemsize >= 4:  # measured: fp32 on the CPU -> the per-expert kernel
        if compiling:
            return "eager"
        return "padded" if max(counts) * len(counts) == sum(counts) else "loop"  # equal blocks: bmm
    if grouped_ok:
        return "grouped"
    # grouped GEMM is unsupported here (widths, dtype or device): pad within the limit, else loop
    if on_cpu:  # tiers measured on the CPU only (docs/BENCHMARKS.md)
        tiers = tier_plan(list(counts))
    else:
        tiers = [(list(range(len(counts))), 0, max(counts))]
    padded_rows = sum(len(experts) * (hi - lo) for experts, lo, hi in tiers)
    if padded_rows <= PAD_LIMIT * max(sum(counts), 1):
        return "padded" if len(tiers) == 1 else "bucketed"
    return "loop"


class Kernel(Protocol):
    """The one signature of every kernel in `KERNELS`: `expert_ffn_combine`'s arguments, with
    ``counts`` the host view of ``counts_E`` (read on first use)."""

    def __call__(
        self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_E: Tensor,
        counts: Sequence[int], w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
        b_out: Tensor | None, activation: str, slot_KT: Tensor | None,
    ) -> Tensor: ...


def _on_layout(layout, x_TD, w_in, w_out, b_in, b_out, activation, slot_KT) -> Tensor:
    rows_KT = None if slot_KT is None else layout.row_S[slot_KT]
    return _ExpertFFNCombine.apply(
        x_TD, layout.weight_R, w_in, w_out, b_in, b_out, layout, activation, rows_KT
    )


def loop_kernel(x_TD, token_S, weight_S, counts_E, counts, w_in, w_out, b_in, b_out, activation, slot_KT):
    """``loop``: `moe_core.expert_loop`, one expert block at a time."""
    return expert_loop_ffn_combine(
        x_TD, token_S, weight_S.to(x_TD.dtype), list(counts), w_in, w_out, b_in, b_out, activation
    )


def padded_kernel(x_TD, token_S, weight_S, counts_E, counts, w_in, w_out, b_in, b_out, activation, slot_KT):
    """``padded``: rows padded to the largest count, one ``bmm`` per matrix. Like the other kernels
    (whose ``out=`` GEMMs autocast does not reach) it computes in the dtype of its inputs, so
    autocast is off inside it (its first ``bmm`` alone would otherwise turn 16-bit)."""
    layout = _Padded(counts_E, token_S, weight_S.to(x_TD.dtype), max(counts), x_TD.shape[0])
    with torch.autocast(x_TD.device.type, enabled=False):
        return _on_layout(layout, x_TD, w_in, w_out, b_in, b_out, activation, slot_KT)


def bucketed_kernel(x_TD, token_S, weight_S, counts_E, counts, w_in, w_out, b_in, b_out, activation, slot_KT):
    """``bucketed``: the experts padded in the tiers of `tier_plan`, one ``bmm`` per tier."""
    layout = _Bucketed(counts_E, token_S, weight_S.to(x_TD.dtype), tier_plan(list(counts)), x_TD.shape[0])
    return _on_layout(layout, x_TD, w_in, w_out, b_in, b_out, activation, slot_KT)


def grouped_kernel(x_TD, token_S, weight_S, counts_E, counts, w_in, w_out, b_in, b_out, activation, slot_KT):
    """``grouped``: ``torch._grouped_mm`` over the sorted rows; never reads ``counts``."""
    layout = _Grouped(counts_E, token_S, weight_S.to(x_TD.dtype))
    return _on_layout(layout, x_TD, w_in, w_out, b_in, b_out, activation, slot_KT)


@torch.compiler.disable
def eager_kernel(x_TD, token_S, weight_S, counts_E, counts, w_in, w_out, b_in, b_out, activation, slot_KT):
    """``eager``: `expert_ffn_combine` with ``auto`` outside the compiled graph (one break)."""
    return expert_ffn_combine(
        x_TD, token_S, weight_S, counts_E, w_in, w_out, b_in, b_out, activation, "auto", slot_KT
    )


KERNELS: dict[str, Kernel] = {
    "loop": loop_kernel,
    "padded": padded_kernel,
    "bucketed": bucketed_kernel,
    "grouped": grouped_kernel,
    "eager": eager_kernel,
}


class _HostCounts:
    """``counts_E`` as a host sequence, read (one host sync, or a graph break under
    ``torch.compile``) and checked against the number of slots the first time it is used."""

    def __init__(self, counts_E: Tensor, num_slots: int) -> None:
        self.counts_E, self.num_slots, self.values = counts_E, num_slots, None

    def read(self) -> list[int]:
        if self.values is None:
            values = self.counts_E.tolist()
            if sum(values) > self.num_slots:
                raise ValueError(f"counts_E sums to {sum(values)} but there are only {self.num_slots} slots")
            self.values = values
        return self.values

    def __len__(self) -> int:
        return self.counts_E.shape[0]

    def __getitem__(self, index: int) -> int:
        return self.read()[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.read())


def expert_ffn_combine(
    x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_E: Tensor,
    w_in: Tensor, w_out: Tensor, b_in: Tensor | None, b_out: Tensor | None,
    activation: str, method: str = "auto", slot_KT: Tensor | None = None,
) -> Tensor:
    """``out[t] = sum_s weight_S[s] * ffn_{e(s)}(x_TD[token_S[s]])``, ``(T, D)``, by
    ``KERNELS[choose_kernel(...)]``.

    Slots are sorted by expert: the first ``counts_E[0]`` go to expert 0, and so on; slots after
    ``counts_E.sum()`` (dropped) are skipped. ``slot_KT`` (optional): token t's slots are exactly
    ``slot_KT[:, t]`` (positions in the sorted order) -- the combine is then K gathers instead of an
    ``index_add_``. ``ffn_e(x) = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``. ``method``:
    ``auto`` or a kernel name (`METHODS`). In eager mode on the CPU the counts are read (free
    there) and checked before any kernel runs; elsewhere only a choice or kernel that needs them
    reads them (one host sync).
    """
    E = w_in.shape[0]
    if counts_E.shape != (E,):
        raise ValueError(f"counts_E must have shape (num_experts={E},), got {tuple(counts_E.shape)}")
    compiling = torch.compiler.is_compiling()
    counts = _HostCounts(counts_E, token_S.shape[0])
    if x_TD.device.type == "cpu" and not compiling:
        counts.read()
    grouped_ok = grouped_mm_supported(x_TD, x_TD.shape[1], w_in.shape[2], w_out.shape[1], w_out.shape[2])
    name = choose_kernel(x_TD.device, x_TD.dtype, compiling, counts, grouped_ok=grouped_ok, method=method)
    # no tensor op before the kernel: under torch.compile the eager kernel is then the frame's
    # only break, with no graph before it
    return KERNELS[name](
        x_TD, token_S, weight_S, counts_E, counts, w_in, w_out, b_in, b_out, activation, slot_KT
    )
