"""Expert modules: what the routed tokens are computed by.

* `ExpertBank` -- E feed-forward experts (GShard / Switch Transformer style, Lepikhin et al. 2020,
  Fedus et al. 2021) with stacked weights ``w_in`` ``(E, D, H)`` (``(E, D, 2H)`` for SwiGLU,
  Shazeer 2020) and ``w_out`` ``(E, H, D)``. Its ``forward_sorted`` is the fused fast path the
  dispatch uses: gather, expert GEMMs, weighted combine, as one autograd node with a hand-written
  backward (`moe_core.kernels.expert_ffn_combine`), computed one expert block at a time
  (``loop``, `moe_core.expert_loop`: the ``auto`` choice for fp32 on the CPU), with grouped GEMMs
  (``torch._grouped_mm``: ``auto`` for 16-bit floats and on CUDA bf16) or with batched padded
  ``bmm`` (one, or one per padding tier; ``auto`` for equal blocks such as expert choice).
* `ModuleExperts` -- any list of modules (heterogeneous allowed), computed one expert at a time.
* `ConvExperts` -- each expert a small conv block ``conv -> norm -> act`` (GroupNorm, BatchNorm or
  none; the activation optional) over feature-map tokens ``(C, H, W)``, one routing decision per
  feature map (the routed-convolution setting of CondConv, Yang et al. 2019, done as sparse routing
  instead of kernel mixing). A backbone's own block (conv-BN-act, a residual block) goes in
  `ModuleExperts` with ``feature_dims=3``.
* `FFN` -- a plain MLP, the shared experts of DeepSeekMoE (Dai et al. 2024).

Every experts module has ``num_experts``, ``feature_dims`` (1 for vectors, 3 for conv feature maps)
and three ways to run:

* ``forward(x_S..., counts_E)``: rows grouped by expert in order, the first ``counts_E[0]`` rows go
  to expert 0, the next ``counts_E[1]`` to expert 1, ...; rows after ``counts_E.sum()`` (slots
  dropped by capacity) are not computed and give zeros;
* ``forward_dense(x_T...) -> y_TE...``: every expert on every token;
* ``forward_batched(x_EC...) -> y_EC...``: a fixed number of rows per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.activations import ACTIVATIONS, apply_activation
from moe_core.checks import check_positive_int
from moe_core.kernels import METHODS, expert_ffn_combine


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class ExpertBank(nn.Module):
    """E feed-forward experts ``y = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` with stacked weights.

    Initialised per expert like ``nn.Linear``: weights and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    feature_dims = 1

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_positive_int(num_experts, "num_experts")
        check_positive_int(d_model, "d_model")
        check_positive_int(d_hidden, "d_hidden")
        _check_activation(activation)
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.d_out = d_model
        self.activation, self.method = activation, method
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        if bias:
            self.b_in = nn.Parameter(torch.empty(num_experts, width))
            self.b_out = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound_in, bound_out = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_hidden)
        nn.init.uniform_(self.w_in, -bound_in, bound_in)
        nn.init.uniform_(self.w_out, -bound_out, bound_out)
        if self.b_in is not None:
            nn.init.uniform_(self.b_in, -bound_in, bound_in)
            nn.init.uniform_(self.b_out, -bound_out, bound_out)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}, method={self.method!r}"
        )

    def forward(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        """Rows of ``x_SD`` grouped by expert (``counts_E`` rows each, then ignored rows) -> ``y_SD``."""
        if x_SD.dim() != 2 or x_SD.shape[1] != self.d_model:
            raise ValueError(
                f"ExpertBank.forward: x_SD must have shape (S, d_model={self.d_model}), got {tuple(x_SD.shape)}"
            )
        rows_S = torch.arange(x_SD.shape[0], device=x_SD.device)
        return self.forward_sorted(x_SD, rows_S, x_SD.new_ones(x_SD.shape[0]), counts_E, rows_S[None])

    def forward_sorted(
        self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_E: Tensor,
        slot_KT: Tensor | None = None,
    ) -> Tensor:
        """Fused gather -> experts -> weighted combine (`moe_core.kernels.expert_ffn_combine`):
        ``out_TD[t] = sum over slots s of token t of weight_S[s] * expert_{e(s)}(x_TD[t])``, slots
        sorted by expert (``counts_E`` each, then the dropped ones)."""
        return expert_ffn_combine(
            x_TD, token_S, weight_S, counts_E, self.w_in, self.w_out, self.b_in, self.b_out,
            self.activation, self.method, slot_KT,
        )

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: ``(T, D) -> (T, E, D)``."""
        h_TEH = torch.einsum("td,edh->teh", x_TD, self.w_in)
        if self.b_in is not None:
            h_TEH = h_TEH + self.b_in
        y_TED = torch.einsum("teh,ehd->ted", apply_activation(h_TEH, self.activation), self.w_out)
        if self.b_out is not None:
            y_TED = y_TED + self.b_out
        return y_TED

    def forward_batched(self, x_ECD: Tensor) -> Tensor:
        """The same number of rows per expert: ``(E, C, D) -> (E, C, D)``."""
        h_ECH = torch.bmm(x_ECD, self.w_in)
        if self.b_in is not None:
            h_ECH = h_ECH + self.b_in[:, None, :]
        y_ECD = torch.bmm(apply_activation(h_ECH, self.activation), self.w_out)
        if self.b_out is not None:
            y_ECD = y_ECD + self.b_out[:, None, :]
        return y_ECD


def split_sizes(counts_E: Tensor, num_rows: int) -> list[int]:
    """Python sizes ``[counts_E..., num_rows - counts_E.sum()]`` (one host sync)."""
    sizes = [int(c) for c in counts_E.tolist()]
    rest = num_rows - sum(sizes)
    if rest < 0:
        raise ValueError(f"counts_E sums to {sum(sizes)} but x has only {num_rows} rows")
    return sizes + [rest]


def _rows_by_expert(x_S: Tensor, counts_E: Tensor, num_experts: int) -> tuple[list[Tensor], int]:
    """Split the grouped rows into one slice per expert, plus the number of trailing ignored rows."""
    if counts_E.shape != (num_experts,):
        raise ValueError(f"counts_E must have shape (num_experts={num_experts},), got {tuple(counts_E.shape)}")
    sizes = split_sizes(counts_E, x_S.shape[0])
    pieces = list(x_S.split(sizes))
    return pieces[:-1], sizes[-1]


def _concat_with_zeros(outputs: list[Tensor], num_ignored: int, like: Tensor) -> Tensor:
    """Concatenate per-expert outputs and append zero rows for the ignored (dropped) slots."""
    tail_shape = outputs[0].shape[1:]
    if num_ignored:
        outputs = outputs + [like.new_zeros((num_ignored, *tail_shape))]
    return torch.cat(outputs, dim=0)


class ModuleExperts(nn.Module):
    """Any E modules as experts, each mapping ``(n, *in_features) -> (n, *out_features)``.

    Heterogeneous experts are fine as long as every expert produces the same output shape.
    Computed with a Python loop over experts (never over tokens); every expert runs each call,
    on its block of rows (possibly empty), so all of them get gradients. ``feature_dims=3`` holds
    a backbone's own conv blocks (e.g. conv-BN-GELU) over feature maps ``(C, H, W)``: a BatchNorm
    inside an expert then sees, in training, the maps routed to that expert.
    """

    def __init__(self, modules: list[nn.Module], feature_dims: int = 1) -> None:
        super().__init__()
        if isinstance(modules, nn.Module) and not isinstance(modules, nn.ModuleList):
            raise ValueError("modules must be a list of nn.Module experts, got a single module")
        modules = list(modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(
                f"modules must be a non-empty list of nn.Module, got {[type(m).__name__ for m in modules]}"
            )
        check_positive_int(feature_dims, "feature_dims")
        self.experts = nn.ModuleList(modules)
        self.num_experts = len(modules)
        self.feature_dims = feature_dims
        d_models = {getattr(m, "in_features", None) for m in modules}
        self.d_model = d_models.pop() if len(d_models) == 1 else None

    def forward(self, x_S: Tensor, counts_E: Tensor) -> Tensor:
        pieces, num_ignored = _rows_by_expert(x_S, counts_E, self.num_experts)
        outputs = [expert(piece) for expert, piece in zip(self.experts, pieces, strict=True)]
        return _concat_with_zeros(outputs, num_ignored, x_S)

    def forward_dense(self, x_T: Tensor) -> Tensor:
        return torch.stack([expert(x_T) for expert in self.experts], dim=1)

    def forward_batched(self, x_EC: Tensor) -> Tensor:
        if x_EC.shape[0] != self.num_experts:
            raise ValueError(
                f"forward_batched: x must have num_experts={self.num_experts} rows on dim 0, "
                f"got shape {tuple(x_EC.shape)}"
            )
        return torch.stack([expert(x) for expert, x in zip(self.experts, x_EC, strict=True)], dim=0)


CONV_NORMS = ("group", "batch", None)
CONV_ACTIVATIONS = ("relu", "gelu", "silu", None)
BATCH_NORM_MOMENTUM, BATCH_NORM_EPS = 0.1, 1e-5
"""``norm="batch"``: the running-statistics momentum and epsilon of ``nn.BatchNorm2d``."""


class ConvExperts(nn.Module):
    """E conv blocks ``conv(k x k, same padding) -> norm (optional) -> act (optional)``.

    Tokens are feature maps ``(C_in, H, W)``; every expert maps them to ``(C_out, H, W)``. In an
    `MoE` a routing decision is made per token, i.e. per whole feature map: ``x (B, C, H, W)``
    sends each image to its experts (routed on its spatial mean ``(B, C)`` unless the layer gets a
    ``router_input``); ``x (B, P, C, h, w)`` routes each of the P maps (e.g. patches) on its own.

    Args:
        norm: ``"group"`` (GroupNorm with ``norm_groups`` groups, per sample: an expert's output
            does not depend on which other tokens it received), ``"batch"`` (BatchNorm per expert,
            as in a ResNet block: in training each expert normalises with the statistics of the
            maps routed to it in this call and updates its own running statistics, which eval
            mode uses; the conv then has no bias), or None (no normalisation).
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or None (the backbone applies its own).

    ``forward`` loops over the E contiguous slices; ``forward_dense`` and ``forward_batched`` are
    one grouped convolution.
    """

    feature_dims = 3

    def __init__(
        self,
        num_experts: int,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        norm: str | None = "group",
        norm_groups: int = 1,
        activation: str | None = "relu",
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        check_positive_int(num_experts, "num_experts")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        if norm not in CONV_NORMS:
            raise ValueError(f"norm must be one of {CONV_NORMS}, got {norm!r}")
        if norm == "group":
            if norm_groups == 0:
                raise ValueError("norm_groups must be >= 1, got 0 (use norm=None for no normalisation)")
            check_positive_int(norm_groups, "norm_groups")
            if out_channels % norm_groups:
                raise ValueError(
                    f"norm_groups must divide out_channels={out_channels}, got {norm_groups}"
                )
        if activation not in CONV_ACTIVATIONS:
            raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.in_channels, self.out_channels = num_experts, in_channels, out_channels
        self.d_model = in_channels
        self.kernel_size, self.norm, self.activation = kernel_size, norm, activation
        self.norm_groups = norm_groups if norm == "group" else 0
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size).uniform_(-bound, bound)
        )
        if norm == "batch":  # the normalisation removes a per-channel bias
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels).uniform_(-bound, bound))
        if norm is not None:
            self.norm_weight = nn.Parameter(torch.ones(num_experts, out_channels))
            self.norm_bias = nn.Parameter(torch.zeros(num_experts, out_channels))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        if norm == "batch":
            self.register_buffer("running_mean", torch.zeros(num_experts, out_channels))
            self.register_buffer("running_var", torch.ones(num_experts, out_channels))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def extra_repr(self) -> str:
        groups = f", norm_groups={self.norm_groups}" if self.norm == "group" else ""
        return (
            f"num_experts={self.num_experts}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"norm={self.norm!r}{groups}, activation={self.activation!r}"
        )

    def _act(self, h: Tensor) -> Tensor:
        if self.activation is None:
            return h
        return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.activation](h)

    def _normalise(self, h: Tensor, experts: slice | int, groups: int) -> Tensor:
        """The norm of ``experts`` (one index, or ``slice(None)`` for all of them stacked along
        the channels of ``h``); ``groups``: how many experts' channels ``h`` holds."""
        if self.norm is None:
            return h
        weight, bias = self.norm_weight[experts].reshape(-1), self.norm_bias[experts].reshape(-1)
        if self.norm == "group":
            return F.group_norm(h, groups * self.norm_groups, weight, bias)
        return F.batch_norm(  # running statistics updated in place through these views
            h, self.running_mean[experts].view(-1), self.running_var[experts].view(-1), weight, bias,
            self.training, BATCH_NORM_MOMENTUM, BATCH_NORM_EPS,
        )

    def _check(self, x: Tensor, where: str) -> None:
        if x.dim() < 4 or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"ConvExperts.{where}: x must have shape (..., in_channels={self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )

    def _block(self, x_NCHW: Tensor, e: int) -> Tensor:
        bias = None if self.bias is None else self.bias[e]
        h = F.conv2d(x_NCHW, self.weight[e], bias, padding=self.kernel_size // 2)
        return self._act(self._normalise(h, e, 1))

    def _all_experts(self, x_N: Tensor, groups: int) -> Tensor:
        """All experts in one conv: ``groups=1`` runs every expert on ``x_N (N, C_in, H, W)``;
        ``groups=E`` runs expert e on channel group e of ``x_N (N, E*C_in, H, W)``.
        Returns ``(N, E*C_out, H, W)``."""
        E, C_out = self.num_experts, self.out_channels
        h = F.conv2d(
            x_N, self.weight.reshape(E * C_out, *self.weight.shape[2:]),
            None if self.bias is None else self.bias.reshape(-1),
            padding=self.kernel_size // 2, groups=groups,
        )
        return self._act(self._normalise(h, slice(None), E))

    def forward(self, x_SCHW: Tensor, counts_E: Tensor) -> Tensor:
        self._check(x_SCHW, "forward")
        pieces, num_ignored = _rows_by_expert(x_SCHW, counts_E, self.num_experts)
        outputs = [self._block(piece, e) for e, piece in enumerate(pieces)]
        return _concat_with_zeros(outputs, num_ignored, x_SCHW)

    def forward_dense(self, x_TCHW: Tensor) -> Tensor:
        """Every expert on every token in one convolution: ``(T, C, H, W) -> (T, E, C_out, H, W)``."""
        self._check(x_TCHW, "forward_dense")
        y = self._all_experts(x_TCHW, groups=1)
        return y.reshape(x_TCHW.shape[0], self.num_experts, self.out_channels, *y.shape[-2:])

    def forward_batched(self, x_ECCHW: Tensor) -> Tensor:
        """``(E, n, C, H, W) -> (E, n, C_out, H, W)`` as one grouped convolution."""
        self._check(x_ECCHW, "forward_batched")
        E, n = x_ECCHW.shape[:2]
        if E != self.num_experts:
            raise ValueError(
                f"forward_batched: x must have num_experts={self.num_experts} on dim 0, got {E}"
            )
        x_N = x_ECCHW.transpose(0, 1).reshape(n, E * self.in_channels, *x_ECCHW.shape[-2:])
        y = self._all_experts(x_N, groups=E).reshape(n, E, self.out_channels, *x_ECCHW.shape[-2:])
        return y.transpose(0, 1)


class FFN(nn.Module):
    """A plain MLP ``(..., D) -> (..., D)``: ``Linear(D, H) -> act -> Linear(H, D)`` (SwiGLU: ``2H``).

    DeepSeekMoE's shared experts are ``FFN(d_model, num_shared * d_hidden)``.
    """

    feature_dims = 1

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_hidden, "d_hidden")
        _check_activation(activation)
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.d_out = d_model
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.fc_in = nn.Linear(d_model, width, bias=bias)
        self.fc_out = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(apply_activation(self.fc_in(x), self.activation))


EXPERTS: dict[str, type[nn.Module]] = {
    "ffn_bank": ExpertBank,
    "modules": ModuleExperts,
    "conv": ConvExperts,
}
