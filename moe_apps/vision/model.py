"""The vision networks, all built by `build_model(config)`: an airbench94-style CIFAR-10 backbone
(Keller Jordan 2024, after hlb-CIFAR10 by Tysam&) with routed conv experts (`moe`), a per-image
mixture of kernels (`condconv`: CondConv, Yang et al. 2019 / dynamic convolution, Chen et al.
2020; the layer is `moe_apps.vision.condconv.CondConv2d`), or none (`dense`, `dense-wide`).

Backbone: uint8 images -> normalise -> frozen 2x2 patch-whitening conv (filters = +- the
eigenvectors of the training patches' covariance scaled by 1/sqrt(eigenvalue), bias trained) ->
GELU -> three conv groups (conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU), BN without
affine weight, convs dirac-initialised -> MaxPool(3) -> bias-free linear head x logit_scale.

`moe`: each chosen conv group is E copies of that group behind a top-k router
(`moe_core.MoE` + `ModuleExperts`, sorted dispatch: each image runs only its k experts). The router
sees the spatial mean of the group's input, batch-normalised (`ExpertStage`), and by the recipe's
default a detached copy of it (`VisionNet.router_input_grad`: the router's losses train the gate,
not the features before it). Its combine weights are the top-k probabilities
divided by their detached sum (`DetachedSumRouter`): in the forward pass they sum to 1 (so with
k = 1 the chosen group's output passes unscaled, as in the dense backbone), while the router still
gets the task's gradient through them (with plain renormalisation a top-1 weight is the constant 1).
With ``router="gumbel"`` the gate is `moe_core.GumbelRouter` instead (k = 1: the expert is sampled
from the gate's softmax while training, with a forward weight of 1 and a straight-through gradient).
With ``expert_core`` the experts' conv kernels read a shared core plus a per-expert residual
(`moe_core.shared_core.SharedCore`, after RMoE, Wu et al. 2022): the core learns from every image,
a residual from its expert's images only; the compute per image is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_apps.vision.condconv import CondConv2d
from moe_apps.vision.config import ModelConfig
from moe_core import (
    GumbelRouter,
    ModuleExperts,
    MoE,
    Routing,
    SharedCore,
    TopKRouter,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
IMAGE_SIZE = 32


@dataclass(frozen=True)
class VisionOutput:
    """What a vision model returns: ``logits_BC`` and, per expert stage name, ``expert_BK`` (the
    experts each image went to; for condconv, per conv ``stage{s}.conv{1,2}``, the kernel with
    the largest mixing weight; empty for dense models)."""

    logits_BC: Tensor
    experts: dict[str, Tensor]


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BN with a frozen unit weight (only the bias learns), airbench's momentum convention. eps is
    PyTorch's 1e-5, not airbench's 1e-12: under CPU bf16 autocast a channel that is constant over
    the batch can get a slightly negative variance estimate, and 1e-12 then gives NaN."""
    norm = nn.BatchNorm2d(channels, momentum=1.0 - momentum, eps=1e-5)
    norm.weight.requires_grad_(False)
    return norm


def dirac_conv(c_in: int, c_out: int, *, shift_in: int = 0, shift_out: int = 0) -> nn.Conv2d:
    """3x3 same-padding conv without bias; min(c_in, c_out) of its filters start as identity maps:
    filter ``(i + shift_out) % c_out`` copies input channel ``(i + shift_in) % c_in``. Unshifted,
    the first filters copy the first channels (``nn.init.dirac_``); narrow experts shift them so
    that each reads (or writes) its own block of channels."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    i = torch.arange(min(c_in, c_out))
    out, inp = (i + shift_out) % c_out, (i + shift_in) % c_in
    with torch.no_grad():
        conv.weight[out] = 0.0
        conv.weight[out, inp, 1, 1] = 1.0
    return conv


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward hands on the gradient in channels_last layout."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def channels_last_grad(x: Tensor) -> Tensor:
    """``x``, with its gradient made channels_last in the backward pass. An expert's output reaches
    the loss through the dispatch's concatenation and scatter, which hand back a contiguous (NCHW)
    gradient; against the channels_last tensors GELU and BatchNorm saved, their backward then runs
    a slow mixed-layout path (a moe step took 1.13 x dense's in a probe, 1.01 x with this;
    docs/BENCHMARKS.md, Vision)."""
    return _ChannelsLastGrad.apply(x) if x.is_contiguous(memory_format=torch.channels_last) else x


class ConvGroup(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU: ``(B, c_in, H, W) -> (B, c_out, H/2, W/2)``.
    ``hidden``: the first conv's output width (default ``c_out``); ``shift``: where its identity
    filters start (`dirac_conv`: the first conv reads channels from ``shift`` on, the second
    writes them from ``shift`` on)."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float, *, hidden: int | None = None,
                 shift: int = 0) -> None:
        super().__init__()
        hidden = c_out if hidden is None else hidden
        self.conv1 = dirac_conv(c_in, hidden, shift_in=shift)
        self.conv2 = dirac_conv(hidden, c_out, shift_out=shift)
        self.norm1, self.norm2 = batch_norm(hidden, bn_momentum), batch_norm(c_out, bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return self._empty(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the dispatch gathers rows NCHW
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return channels_last_grad(F.gelu(self.norm2(self.conv2(x))))

    def _empty(self, x: Tensor) -> Tensor:
        """An expert no image chose: no batch statistics to take, so the norms use their running
        ones (left unchanged); the empty output still depends on every parameter, which then gets
        a zero gradient rather than none (DDP needs one for each parameter in every step)."""

        def norm(bn: nn.BatchNorm2d, y: Tensor) -> Tensor:
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

        x = F.gelu(norm(self.norm1, F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(norm(self.norm2, self.conv2(x)))


class DetachedSumRouter(nn.Module):
    """A `TopKRouter` (no renormalisation) whose top-k weights are divided by their detached sum."""

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.inner = TopKRouter(d_model, num_experts, top_k=top_k, renormalize=False)
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k

    def forward(self, x: Tensor, *, token_ids_T: Tensor | None = None) -> Routing:
        r = self.inner(x, token_ids_T=token_ids_T)
        w_TK = r.combine_weights_TK / r.combine_weights_TK.sum(-1, keepdim=True).detach()
        return Routing(r.probs_TE, r.logits_TE, r.expert_indices_TK, w_TK)


# ModelConfig.router -> a builder of moe's gate from (d_model, num_experts, top_k)
ROUTER_BUILDERS = {
    "topk": DetachedSumRouter,
    "gumbel": lambda d_model, num_experts, top_k: GumbelRouter(d_model, num_experts),
}


class ExpertStage(nn.Module):
    """E conv groups behind a top-k router (`moe_core.MoE`). The router sees the spatial mean of
    the input, standardised per channel by a BatchNorm without affine parameters: the pooled
    post-GELU features share a large common component that would otherwise send every image to
    the same expert once the BN biases move (they learn at 64 x the lr). ``core``: the experts'
    two conv kernels are a shared core plus per-expert residuals (`SharedCore`; E >= 2).
    ``hidden``: each expert's inner width (fine-grained experts, DeepSeekMoE: E narrow experts at
    top-k, e.g. 4 of width 128 at k = 2 cost what 2 of width 256 cost at k = 1); expert e's
    identity filters start at channel e x hidden, so narrow experts begin on different blocks.
    ``router``: a key of `ROUTER_BUILDERS`."""

    def __init__(self, c_in: int, c_out: int, num_experts: int, top_k: int, bn_momentum: float, *,
                 core: bool = False, hidden: int | None = None, router: str = "topk") -> None:
        super().__init__()
        groups = [ConvGroup(c_in, c_out, bn_momentum, hidden=hidden, shift=0 if hidden is None else e * hidden)
                  for e in range(num_experts)]
        experts = ModuleExperts(groups, feature_dims=3)
        self.core = SharedCore(groups, ["conv1.weight", "conv2.weight"]) if core and num_experts > 1 else None
        self.router_norm = nn.BatchNorm1d(c_in, affine=False, momentum=1.0 - bn_momentum)
        self.moe = MoE(router=ROUTER_BUILDERS[router](c_in, num_experts, top_k), experts=experts)

    def router_input(self, x: Tensor, *, grad: bool = True) -> Tensor:
        """The router's features; ``grad=False`` detaches them, so the router's losses and the
        gate's gradient train the router alone and leave the backbone's features as they are."""
        return self.router_norm((x if grad else x.detach()).float().mean(dim=(-2, -1)))

    def forward(self, x: Tensor, *, router_input_grad: bool = True) -> tuple[Tensor, Tensor]:
        out = self.moe(x, router_input=self.router_input(x, grad=router_input_grad))
        return out.output, out.routing.expert_indices_TK


class CondConvGroup(ConvGroup):
    """A `ConvGroup` whose two convolutions are `CondConv2d` (the norms stay shared). Returns
    ``(output, {"conv1": kernel_B1, "conv2": kernel_B1})``: per conv, the kernel with the largest
    mixing weight of each image (what eval's expert-use heatmap counts)."""

    def __init__(self, c_in: int, c_out: int, num_experts: int, bn_momentum: float) -> None:
        super().__init__(c_in, c_out, bn_momentum)
        self.conv1, self.conv2 = CondConv2d(c_in, c_out, num_experts), CondConv2d(c_out, c_out, num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y, probs1_BE = self.conv1.forward_with_weights(x)
        x = F.gelu(self.norm1(F.max_pool2d(y, 2)))
        y, probs2_BE = self.conv2.forward_with_weights(x)
        chosen = {"conv1": probs1_BE.argmax(-1, keepdim=True), "conv2": probs2_BE.argmax(-1, keepdim=True)}
        return F.gelu(self.norm2(y)), chosen


class PatchWhitening(nn.Module):
    """A 2x2 conv (no padding: 32 -> 31) with frozen filters set by `fit` from training patches; the
    bias learns."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.register_buffer("weight", torch.zeros(width, 3, 2, 2))
        self.bias = nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def fit(self, x_BCHW: Tensor, eps: float = 5e-4) -> None:
        """Filters = +- eigenvectors of the covariance of all 2x2x3 patches of ``x`` (normalised
        float images), scaled by 1 / sqrt(eigenvalue + eps), largest eigenvalues first."""
        patches_ND = F.unfold(x_BCHW.float(), kernel_size=2).transpose(1, 2).reshape(-1, 12).double()
        centred = patches_ND - patches_ND.mean(0)
        cov_DD = centred.T @ centred / patches_ND.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov_DD)  # ascending
        order = eigenvalues.argsort(descending=True)[: self.width // 2]
        filters = (eigenvectors[:, order] / (eigenvalues[order] + eps).sqrt()).T
        filters = filters.reshape(-1, 3, 2, 2).float()
        self.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class VisionNet(nn.Module):
    """The backbone with each group built by ``make_group(stage, c_in, c_out)``."""

    def __init__(self, config: ModelConfig, widths: tuple[int, int, int]) -> None:
        super().__init__()
        self.config, self.widths = config, tuple(widths)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.whiten = PatchWhitening(config.whitening_width)
        self.stage_names: list[str] = []
        groups = []
        c_in = config.whitening_width
        for stage, c_out in enumerate(widths):
            groups.append(self._group(stage, c_in, c_out))
            c_in = c_out
        self.groups = nn.ModuleList(groups)
        self.head = nn.Linear(c_in, NUM_CLASSES, bias=False)
        self.channels_last = True
        self.router_input_grad = True  # training choices (the recipe's), not architecture

    def _group(self, stage: int, c_in: int, c_out: int) -> nn.Module:
        cfg = self.config
        if stage in cfg.expert_stages and cfg.model == "moe":
            self.stage_names.append(f"stage{stage}")
            return ExpertStage(c_in, c_out, cfg.num_experts, cfg.top_k, cfg.bn_momentum,
                               core=cfg.expert_core, hidden=cfg.expert_width, router=cfg.router)
        if stage in cfg.expert_stages and cfg.model == "condconv":
            return CondConvGroup(c_in, c_out, cfg.num_experts, cfg.bn_momentum)
        return ConvGroup(c_in, c_out, cfg.bn_momentum)

    def normalise(self, images_BCHW: Tensor) -> Tensor:
        """uint8 (or [0, 255] float) images -> normalised float32."""
        return (images_BCHW.float() / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def fit_whitening(self, images_BCHW: Tensor) -> None:
        self.whiten.fit(self.normalise(images_BCHW))

    def forward(self, images_BCHW: Tensor) -> VisionOutput:
        x = self.normalise(images_BCHW)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.gelu(self.whiten(x))
        experts: dict[str, Tensor] = {}
        for stage, group in enumerate(self.groups):
            if isinstance(group, ExpertStage):
                x, experts[f"stage{stage}"] = group(x, router_input_grad=self.router_input_grad)
            elif isinstance(group, CondConvGroup):
                x, chosen = group(x)
                experts.update({f"stage{stage}.{conv}": kernel_B1 for conv, kernel_B1 in chosen.items()})
            else:
                x = group(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return VisionOutput(self.head(x).float() * self.config.logit_scale, experts)


def stage_shapes(widths: tuple[int, ...], whitening_width: int) -> list[tuple[int, int, int]]:
    """``(c_in, c_out, input side)`` of each conv group for 32x32 images."""
    side, c_in, shapes = IMAGE_SIZE - 1, whitening_width, []
    for c_out in widths:
        shapes.append((c_in, c_out, side))
        side, c_in = side // 2, c_out
    return shapes


def flops_per_image(config: ModelConfig, widths: tuple[int, ...] | None = None) -> int:
    """Multiply-adds per image of convolutions, router gates and the head (what dominates; BN,
    pooling and activations are left out), computed from the shapes at ``widths`` (default
    ``config.widths``); moe counts the top-k experts an image runs, condconv CondConv's count (the
    kernel mixing and one convolution, whichever of `moe_apps.vision.condconv.MIXED_CONVS` runs)."""
    widths = config.widths if widths is None else widths
    side = IMAGE_SIZE - 1
    total = config.whitening_width * 3 * 4 * side * side
    for stage, (c_in, c_out, side) in enumerate(stage_shapes(widths, config.whitening_width)):
        half = side // 2
        group = 9 * (c_in * c_out * side * side + c_out * c_out * half * half)
        routed = stage in config.expert_stages
        if routed and config.model == "moe":
            h = c_out if config.expert_width is None else config.expert_width
            expert = 9 * (c_in * h * side * side + h * c_out * half * half)
            group = config.top_k * expert + c_in * config.num_experts
        elif routed and config.model == "condconv":  # mixing the kernels + two routers
            group += 9 * config.num_experts * (c_in * c_out + c_out * c_out) + (c_in + c_out) * config.num_experts
        total += group
    return total + widths[-1] * NUM_CLASSES


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _solve_width(config: ModelConfig, score) -> tuple[int, int, int]:
    """Widths equal to ``config.widths`` except the expert stages, set to the one width (searched
    over 1..8x the widest) that minimises ``score(widths)``."""
    top = 8 * max(config.widths)

    def widths_for(w: int) -> tuple[int, int, int]:
        return tuple(w if s in config.expert_stages else c for s, c in enumerate(config.widths))

    best = min(range(1, top + 1), key=lambda w: score(widths_for(w)))
    return widths_for(best)


def resolved_widths(config: ModelConfig) -> tuple[int, int, int]:
    """The widths `build_model` uses: ``config.widths`` for moe / condconv; for dense, the expert
    stages' width at which FLOPs per image equal moe's; for dense-wide, the width at which the
    parameter count equals that of moe's E expert groups (a core's extra copy not counted)."""
    if config.model in ("moe", "condconv"):
        return config.widths
    moe = ModelConfig(**{**config.__dict__, "model": "moe"})
    if config.model == "dense":
        target = flops_per_image(moe)
        return _solve_width(config, lambda w: abs(flops_per_image(config, w) - target))
    # the core re-parametrises E experts' kernels (E + 1 stored): moe can hold what E groups hold
    plain_moe = ModelConfig(**{**moe.__dict__, "expert_core": False})
    target = count_parameters(VisionNet(plain_moe, moe.widths))
    dense = ModelConfig(**{**config.__dict__, "model": "dense"})
    return _solve_width(config, lambda w: abs(_dense_parameters(dense, w) - target))


def _dense_parameters(config: ModelConfig, widths: tuple[int, ...]) -> int:
    """Trainable parameters of the dense backbone at ``widths``, from the shapes."""
    total, c_in = config.whitening_width, config.whitening_width  # whitening bias
    for c_out in widths:
        total += 9 * (c_in * c_out + c_out * c_out) + 2 * c_out  # two convs, two BN biases
        c_in = c_out
    return total + c_in * NUM_CLASSES


def build_model(config: ModelConfig) -> VisionNet:
    """The network of ``config`` (whitening filters still zero: call `fit_whitening`)."""
    return VisionNet(config, resolved_widths(config))
