"""`SharedCore` against plain convolutions with the weights ``core + residual`` written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_core import ModuleExperts, MoE, SharedCore, TopKRouter


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.proj = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.conv(x)).mean(dim=(-2, -1)))


def _experts(n: int = 3) -> list[Block]:
    torch.manual_seed(0)
    return [Block() for _ in range(n)]


def test_experts_start_identical_and_read_core_plus_residual() -> None:
    experts = _experts()
    first = experts[0].conv.weight.detach().clone()
    projections = [e.proj.weight.detach().clone() for e in experts]
    core = SharedCore(experts, ["conv.weight"])
    assert len(core.cores) == 1 and torch.equal(core.cores[0], first)
    x = torch.randn(5, 3, 6, 6)
    for e, proj in zip(experts, projections, strict=True):
        assert torch.equal(e.conv.weight, first)  # residual 0: every expert starts as expert 0
        assert torch.equal(e.proj.weight, proj)  # parameters not named are left alone
    with torch.no_grad():
        for e in experts:
            e.conv.parametrizations.weight.original.normal_()
    for e in experts:
        residual = e.conv.parametrizations.weight.original
        expected = e.proj(F.relu(F.conv2d(x, core.cores[0] + residual, padding=1)).mean(dim=(-2, -1)))
        torch.testing.assert_close(e(x), expected)


def test_the_core_gets_every_experts_gradient_a_residual_only_its_own() -> None:
    experts = _experts(2)
    core = SharedCore(experts, ["conv.weight"])
    with torch.no_grad():
        for e in experts:
            e.conv.parametrizations.weight.original.normal_(std=0.1)
    x0, x1 = torch.randn(4, 3, 5, 5), torch.randn(3, 3, 5, 5)
    (experts[0](x0).square().sum() + experts[1](x1).sum()).backward()

    def weight_grad(e: Block, x: torch.Tensor, loss) -> torch.Tensor:  # the same loss on a plain conv
        w = (core.cores[0] + e.conv.parametrizations.weight.original).detach().requires_grad_(True)
        loss(e.proj(F.relu(F.conv2d(x, w, padding=1)).mean(dim=(-2, -1)))).backward()
        return w.grad

    g0 = weight_grad(experts[0], x0, lambda y: y.square().sum())
    g1 = weight_grad(experts[1], x1, lambda y: y.sum())
    torch.testing.assert_close(core.cores[0].grad, g0 + g1)
    torch.testing.assert_close(experts[0].conv.parametrizations.weight.original.grad, g0)
    torch.testing.assert_close(experts[1].conv.parametrizations.weight.original.grad, g1)


def test_the_core_is_a_parameter_of_the_shared_core_only() -> None:
    experts = _experts(2)
    owner = nn.Module()
    owner.experts = ModuleExperts(experts)
    owner.core = SharedCore(experts, ["conv.weight"])
    names = [n for n, _ in owner.named_parameters()]
    assert names.count("core.cores.0") == 1
    assert not any("_core" in n for n in names if n.startswith("experts."))
    assert sum(p.numel() for p in owner.parameters()) == 3 * 4 * 3 * 3 * 3 + 2 * (4 * 2 + 2)


def test_state_dict_round_trip_and_a_routed_layer_trains() -> None:
    torch.manual_seed(1)
    experts = _experts(2)
    layer = MoE(router=TopKRouter(3, 2, top_k=1), experts=ModuleExperts(experts, feature_dims=3))
    layer.core = SharedCore(experts, ["conv.weight"])
    x = torch.randn(8, 3, 6, 6)
    layer(x).output.sum().backward()
    assert layer.core.cores[0].grad is not None and layer.core.cores[0].grad.abs().sum() > 0
    twin_experts = _experts(2)
    twin = MoE(router=TopKRouter(3, 2, top_k=1), experts=ModuleExperts(twin_experts, feature_dims=3))
    twin.core = SharedCore(twin_experts, ["conv.weight"])
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.01)
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin(x).output, layer(x).output)


@pytest.mark.parametrize(("experts", "names", "match"), [
    (lambda: _experts(1), ["conv.weight"], "at least 2 experts"),
    (lambda: _experts(2), [], "distinct parameter paths"),
    (lambda: _experts(2), ["conv.bias"], "no parameter 'conv.bias'"),
    (lambda: _experts(2), ["nope.weight"], "no submodule 'nope'"),
    (lambda: [Block(), nn.Sequential(nn.Conv2d(3, 5, 3))], ["0.weight"], "no submodule"),
])
def test_bad_arguments_are_refused(experts, names, match) -> None:
    with pytest.raises(ValueError, match=match):
        SharedCore(experts(), names)


def test_shapes_must_agree_and_a_parameter_is_shared_once() -> None:
    a, b = nn.Linear(3, 4), nn.Linear(3, 5)
    with pytest.raises(ValueError, match="differs in shape"):
        SharedCore([a, b], ["weight"])
    experts = [nn.Linear(3, 4), nn.Linear(3, 4)]
    SharedCore(experts, ["weight"])
    with pytest.raises(ValueError, match="already re-parametrised"):
        SharedCore(experts, ["weight"])
