"""MoE in a CNN: one routing decision per feature map (image), `ConvExperts` with BatchNorm / no
norm / no activation, and a user's own conv-BN-GELU block inside `ModuleExperts`, in training
and eval mode, against per-expert references written from the BatchNorm formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core import ConvExperts, ModuleExperts, MoE, SwitchRouter, TopKRouter

E, C, C_OUT, HW, EPS, MOMENTUM = 3, 3, 4, 5, 1e-5, 0.1


def _batch_norm(h: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    view = (1, -1, 1, 1)
    return (h - mean.view(view)) / torch.sqrt(var.view(view) + EPS) * weight.view(view) + bias.view(view)


def _batch_stats(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel over (N, H, W): mean, biased variance (to normalise), unbiased (running)."""
    n = h.numel() // h.shape[1]
    mean = h.mean(dim=(0, 2, 3))
    var = (h - mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
    return mean, var, var * n / (n - 1)


def _conv_bn_expert(conv: ConvExperts, e: int, x: Tensor, running: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
    """Expert e of a ``norm="batch"`` ConvExperts on the maps ``x`` it received: in training the
    statistics of ``x`` (and ``running[e]`` moved towards them), in eval ``running[e]``."""
    h = F.conv2d(x, conv.weight[e], None, padding=conv.kernel_size // 2)
    if conv.training:
        mean, var, unbiased = _batch_stats(h)
        old_mean, old_var = running[e]
        running[e] = ((1 - MOMENTUM) * old_mean + MOMENTUM * mean, (1 - MOMENTUM) * old_var + MOMENTUM * unbiased)
    else:
        mean, var = running[e]
    h = _batch_norm(h, mean, var, conv.norm_weight[e], conv.norm_bias[e])
    return h if conv.activation is None else F.gelu(h)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_conv_experts_normalise_each_experts_own_maps(training: bool) -> None:
    torch.manual_seed(0)
    conv = ConvExperts(E, C, C_OUT, norm="batch", activation="gelu").train(training)
    assert conv.bias is None  # BatchNorm removes it
    nn.init.normal_(conv.norm_weight)
    nn.init.normal_(conv.norm_bias)
    conv.running_mean.normal_()
    conv.running_var.uniform_(0.5, 2.0)
    running = {e: (conv.running_mean[e].clone(), conv.running_var[e].clone()) for e in range(E)}
    counts = [2, 0, 3]
    x = torch.randn(6, C, HW, HW, requires_grad=True)  # the last row was dropped: zeros
    y = conv(x, torch.tensor(counts))
    ref = torch.cat([
        _conv_bn_expert(conv, 0, x[0:2], running), _conv_bn_expert(conv, 2, x[2:5], running),
        torch.zeros(1, C_OUT, HW, HW),
    ])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    g_y, g_ref = torch.autograd.grad(y.sum(), x), torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_y[0], g_ref[0], atol=1e-5, rtol=1e-4)
    for e in range(E):  # expert 1 received no map: its statistics did not move
        torch.testing.assert_close(conv.running_mean[e], running[e][0])
        torch.testing.assert_close(conv.running_var[e], running[e][1])
    # one grouped convolution for the batched call: each expert's statistics over its own rows
    xb = torch.randn(E, 4, C, HW, HW)
    batched = conv.forward_batched(xb)
    torch.testing.assert_close(
        batched, torch.stack([_conv_bn_expert(conv, e, xb[e], running) for e in range(E)]),
        atol=1e-5, rtol=1e-4,
    )
    torch.testing.assert_close(conv.running_mean, torch.stack([running[e][0] for e in range(E)]))
    dense = conv.forward_dense(x)
    torch.testing.assert_close(
        dense, torch.stack([_conv_bn_expert(conv, e, x, running) for e in range(E)], dim=1),
        atol=1e-5, rtol=1e-4,
    )
    if not training:  # eval: each map on its own, whatever else is in the batch
        torch.testing.assert_close(conv(x[2:3], torch.tensor([0, 0, 1])), y[2:3])


def _user_block(seed: int) -> nn.Module:
    """What a vision backbone would put in an expert: conv -> BatchNorm -> GELU."""
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Conv2d(C, C_OUT, 3, padding=1, bias=False), nn.BatchNorm2d(C_OUT), nn.GELU())
    nn.init.normal_(block[1].weight)
    nn.init.normal_(block[1].bias)
    return block


def _experts(kind: str) -> nn.Module:
    if kind == "module_experts":
        return ModuleExperts([_user_block(e) for e in range(E)], feature_dims=3)
    torch.manual_seed(5)
    conv = ConvExperts(E, C, C_OUT, norm="batch", activation="gelu")
    nn.init.normal_(conv.norm_weight)
    nn.init.normal_(conv.norm_bias)
    return conv


def _as_modules(experts: nn.Module) -> list[nn.Module]:
    """Independent copies of the experts as plain conv-BN-GELU modules."""
    if isinstance(experts, ModuleExperts):
        return [copy.deepcopy(m) for m in experts.experts]
    blocks = []
    for e in range(E):
        block = _user_block(0)
        block[0].weight.data.copy_(experts.weight[e])
        block[1].weight.data.copy_(experts.norm_weight[e])
        block[1].bias.data.copy_(experts.norm_bias[e])
        block[1].running_mean.copy_(experts.running_mean[e])
        block[1].running_var.copy_(experts.running_var[e])
        blocks.append(block.train(experts.training))
    return blocks


def _running_means(experts: nn.Module) -> Tensor:
    if isinstance(experts, ModuleExperts):
        return torch.stack([m[1].running_mean for m in experts.experts])
    return experts.running_mean


@pytest.mark.parametrize("kind", ["module_experts", "conv_experts"])
@pytest.mark.parametrize("training", [True, False])
def test_each_image_is_routed_whole_to_one_conv_expert(kind: str, training: bool) -> None:
    """``x (B, C, H, W)``: one top-1 decision per image, made on its spatial mean; the image goes
    whole through its expert's conv-BN-GELU, and in training each expert's BatchNorm sees exactly
    the images routed to it."""
    experts = _experts(kind)
    router = SwitchRouter(C, E)
    nn.init.normal_(router.gate.weight, std=2.0)
    layer = MoE(router, experts).train(training)
    references = _as_modules(experts)
    B = 10
    x = torch.randn(B, C, HW, HW, generator=torch.Generator().manual_seed(1)) + torch.randn(B, C, 1, 1)
    out = layer(x)
    assert out.output.shape == (B, C_OUT, HW, HW)
    assert out.routing.probs_TE.shape == (B, E)  # one decision per image
    if not training:  # the router sees the spatial mean (no jitter in eval)
        torch.testing.assert_close(out.routing.probs_TE, router(x.mean(dim=(-2, -1))).probs_TE)
    expert_B = out.routing.expert_indices_TK[:, 0]
    weight_B = out.routing.combine_weights_TK[:, 0]
    assert len(set(expert_B.tolist())) >= 2, "the images should spread over experts"
    ref = torch.zeros_like(out.output)
    for e in range(E):
        images = (expert_B == e).nonzero().squeeze(1)
        if training:  # the expert's batch is its images
            ref[images] = references[e](x[images]) if len(images) else ref[images]
        else:  # each image on its own, with the running statistics
            for b in images.tolist():
                ref[b] = references[e](x[b : b + 1])[0]
    ref = ref * weight_B.view(B, 1, 1, 1)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        _running_means(experts), torch.stack([m[1].running_mean for m in references])
    )
    out.output.sum().backward()
    assert all(p.grad is not None for p in experts.parameters())


def test_patches_are_routed_one_by_one() -> None:
    """``x (B, P, C, h, w)``: each of the P maps of an image is its own token."""
    torch.manual_seed(3)
    layer = MoE(TopKRouter(C, E, top_k=2), ModuleExperts([_user_block(e) for e in range(E)], feature_dims=3))
    x = torch.randn(2, 4, C, HW, HW)
    out = layer(x)
    assert out.output.shape == (2, 4, C_OUT, HW, HW)
    assert out.routing.expert_indices_TK.shape == (8, 2)
