"""The vision networks: FLOPs (analytic vs torch's FLOP counter, dense = moe), parameter matching
of dense-wide, sparse dispatch (each image runs only its k experts), CondConv against a per-image
reference, the whitening filters, the router's gradient, and impossible configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moe_apps.vision.condconv import CondConv2d
from moe_apps.vision.config import (
    ModelConfig,
    RecipeConfig,
    VisionConfig,
    get_preset,
    with_overrides,
)
from moe_apps.vision.model import (
    ExpertStage,
    build_model,
    count_parameters,
    flops_per_image,
)
from moe_core import collect_aux_losses

SMALL = dict(widths=(16, 32, 32), whitening_width=8)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def counted_macs_per_image(model: torch.nn.Module, n: int = 16) -> float:
    """Multiply-adds per image of one eval forward, as torch's FlopCounterMode counts them."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(_images(n))
    return counter.get_total_flops() / 2 / n


@pytest.mark.parametrize("model_name,narrow", [("dense", None), ("moe", None), ("condconv", None), ("moe", 12)])
def test_analytic_flops_match_the_flop_counter(model_name: str, narrow: int | None) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=model_name, expert_stages=(1, 2), num_experts=3,
                                    top_k=2 if narrow else 1, expert_width=narrow, **SMALL))
    model.fit_whitening(_images(64))
    for conv in model.modules():  # CondConv's own count is that of its grouped form
        if isinstance(conv, CondConv2d):
            conv.kind = "grouped"
    counted = counted_macs_per_image(model)
    # The counter also sees the kernel-mixing einsum of condconv; both leave out BN/pool/activations.
    assert flops_per_image(model.config, model.widths) == pytest.approx(counted, rel=2e-3)


@pytest.mark.parametrize("top_k,stages", [(1, (2,)), (2, (2,)), (1, (1, 2))])
def test_dense_has_the_flops_of_moe(top_k: int, stages: tuple[int, ...]) -> None:
    moe = build_model(ModelConfig(model="moe", top_k=top_k, expert_stages=stages))
    dense = build_model(ModelConfig(model="dense", top_k=top_k, expert_stages=stages))
    moe_flops = flops_per_image(moe.config, moe.widths)
    dense_flops = flops_per_image(dense.config, dense.widths)
    assert dense_flops == pytest.approx(moe_flops, rel=0.01)
    if top_k == 2:  # two experts per image: the dense stage is wider
        assert dense.widths[2] > moe.widths[2]
    assert counted_macs_per_image(moe, 8) == pytest.approx(moe_flops, rel=2e-3)


def test_narrow_experts_at_top2_cost_what_full_ones_cost_at_top1() -> None:
    """Fine-grained experts (E = 4 of width 128, k = 2) against the default (E = 2 of 256, k = 1):
    the stage's conv multiply-adds by hand from its shapes (256 -> h at 7x7, h -> 256 at 3x3),
    the same parameters but for the extra BN biases and gate rows, and the same dense twin."""
    full = ModelConfig(model="moe")
    narrow = ModelConfig(model="moe", num_experts=4, top_k=2, expert_width=128)
    by_hand = {h: 9 * (256 * h * 7 * 7 + h * 256 * 3 * 3) for h in (128, 256)}
    gates = 256 * (4 - 2)  # two more gate rows
    assert flops_per_image(narrow) - flops_per_image(full) == 2 * by_hand[128] - by_hand[256] + gates
    extra = 4 * (128 + 256) - 2 * (256 + 256) + (4 - 2) * 256  # BN biases, gate rows; the kernels equal
    assert count_parameters(build_model(narrow)) - count_parameters(build_model(full)) == extra
    assert build_model(ModelConfig(**{**narrow.__dict__, "model": "dense"})).widths == (64, 256, 256)
    model = build_model(ModelConfig(model="moe", num_experts=4, top_k=2, expert_width=12, **SMALL))
    assert counted_macs_per_image(model, 8) == pytest.approx(flops_per_image(model.config), rel=2e-3)


def test_narrow_experts_start_on_their_own_block_of_channels() -> None:
    """Expert e's first conv copies input channels from e x h on, its second writes its h channels
    to output channels from e x h on (wrapping around); with the full width nothing shifts, as
    torch's own dirac init."""
    torch.manual_seed(0)
    stage = ExpertStage(16, 16, num_experts=3, top_k=2, bn_momentum=0.6, hidden=6)
    x = torch.randn(2, 16, 4, 4)
    for e, expert in enumerate(stage.moe.experts.experts):
        blocks = [(e * 6 + i) % 16 for i in range(6)]
        torch.testing.assert_close(expert.conv1(x), x[:, blocks])
        h = torch.randn(2, 6, 4, 4)
        torch.testing.assert_close(expert.conv2(h)[:, blocks], h)
    reference = torch.empty(16, 16, 3, 3)
    torch.nn.init.dirac_(reference)
    for expert in ExpertStage(16, 16, num_experts=2, top_k=1, bn_momentum=0.6).moe.experts.experts:
        assert torch.equal(expert.conv1.weight, reference) and torch.equal(expert.conv2.weight, reference)


def test_dense_wide_has_the_parameters_of_moe() -> None:
    """... of moe's E expert groups: a shared core stores one more copy of the two kernels."""
    moe = build_model(ModelConfig(model="moe", num_experts=4, expert_core=False))
    cored = build_model(ModelConfig(model="moe", num_experts=4, expert_core=True))
    wide = build_model(ModelConfig(model="dense-wide", num_experts=4, expert_core=True))
    assert count_parameters(wide) == pytest.approx(count_parameters(moe), rel=0.01)
    assert count_parameters(cored) == count_parameters(moe) + 2 * 9 * 256 * 256
    assert wide.widths[2] > 2 * moe.widths[2]  # one stage, 2.4x wider: 1.5x the FLOPs of moe
    assert flops_per_image(wide.config, wide.widths) > 1.4 * flops_per_image(moe.config, moe.widths)


@pytest.mark.parametrize("top_k", [1, 2])
def test_each_image_runs_only_its_experts(top_k: int) -> None:
    torch.manual_seed(0)
    stage = ExpertStage(8, 16, num_experts=4, top_k=top_k, bn_momentum=0.6).train()
    seen = []
    for expert in stage.moe.experts.experts:
        expert.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    x = torch.randn(40, 8, 12, 12)
    out, experts_BK = stage(x)
    assert out.shape == (40, 16, 6, 6) and experts_BK.shape == (40, top_k)
    assert sum(seen) == 40 * top_k  # not 4 * 40: no expert sees an image that did not pick it
    # output of image b = its chosen experts' outputs, weighted (weights sum to 1 in the forward)
    routing = stage.moe.router(stage.router_input(x))
    assert torch.allclose(routing.combine_weights_TK.sum(-1), torch.ones(40))
    stage.eval()
    out, experts_BK = stage(x)
    routing = stage.moe.router(stage.router_input(x))
    for b in (0, 17, 39):
        want = sum(w * stage.moe.experts.experts[e](x[b:b + 1])[0]
                   for e, w in zip(experts_BK[b].tolist(), routing.combine_weights_TK[b], strict=True))
        torch.testing.assert_close(out[b], want, rtol=1e-4, atol=1e-5)


def test_an_expert_no_image_chose_gets_zero_gradients_not_none() -> None:
    """DDP (`train --nproc`) needs a gradient for every parameter in every step: an expert that
    receives no image runs on the empty batch, its parameters get zeros, its BN statistics stay."""
    torch.manual_seed(0)
    stage = ExpertStage(8, 16, num_experts=4, top_k=1, bn_momentum=0.6).train()
    with torch.no_grad():
        stage.moe.router.inner.gate.weight.zero_()  # equal logits: every image picks one expert
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    out, experts_BK = stage(torch.randn(12, 8, 12, 12))
    out.square().mean().backward()
    chosen = set(experts_BK.flatten().tolist())
    assert len(chosen) == 1
    for e, expert in enumerate(stage.moe.experts.experts):
        for name, param in expert.named_parameters():
            if param.requires_grad:
                assert param.grad is not None, (e, name)
                assert e in chosen or not param.grad.any(), (e, name)
        if e not in chosen:
            assert all(torch.equal(v, before[f"moe.experts.experts.{e}.{k}"])
                       for k, v in expert.state_dict().items())


def test_the_router_learns_from_the_task_loss_with_top1() -> None:
    torch.manual_seed(0)
    stage = ExpertStage(8, 16, num_experts=4, top_k=1, bn_momentum=0.6)
    out, _ = stage(torch.randn(32, 8, 12, 12))
    out.square().mean().backward()
    gate = stage.moe.router.inner.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_the_gumbel_router_samples_while_training_and_passes_its_expert_unscaled() -> None:
    """``router="gumbel"``: in training each image's expert is drawn from the gate's softmax (not
    its argmax), at eval it is the argmax, the chosen group's output passes with weight 1, and the
    gate still gets the task's gradient."""
    torch.manual_seed(0)
    stage = ExpertStage(8, 16, num_experts=2, top_k=1, bn_momentum=0.6, router="gumbel")
    gate = stage.moe.router.gate.weight
    x = torch.randn(4000, 8, 6, 6)
    x[:, 0] = 1.0  # channel 0's mean is 1 in every image
    with torch.no_grad():  # logits (0, 1) for every image: p(expert 1) = 1 / (1 + e^-1) = 0.731
        gate.zero_()
        gate[1, 0] = 1.0
    stage.train()
    stage.router_norm.eval()  # fresh running statistics (0, 1): the router reads the plain mean
    out, experts_BK = stage(x)
    assert experts_BK.float().mean().item() == pytest.approx(0.731, abs=0.03)  # binomial s.d. 0.007
    out.square().mean().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    stage.eval()
    with torch.no_grad():
        out, experts_BK = stage(x[:8])
        assert experts_BK.flatten().tolist() == [1] * 8
        for b in (0, 5):
            torch.testing.assert_close(out[b], stage.moe.experts.experts[1](x[b:b + 1])[0])


@pytest.mark.parametrize("grad", [True, False])
def test_router_input_grad_decides_whether_router_losses_reach_the_backbone(grad: bool) -> None:
    """The balance and z losses always train the gate; only with ``router_input_grad`` do they
    reach the groups before the expert stage. The forward pass is the same either way."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="moe", **SMALL)).train()
    model.fit_whitening(_images(64))
    images = _images(32, seed=1)
    model.router_input_grad = True
    want = model(images).logits_BC.detach()
    model.zero_grad()
    model.router_input_grad = grad
    torch.testing.assert_close(model(images).logits_BC, want)
    sum(collect_aux_losses(model).values()).backward()
    gate = model.groups[2].moe.router.inner.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    backbone = [p.grad for p in model.groups[:2].parameters() if p.requires_grad]
    reached = any(g is not None and g.abs().sum() > 0 for g in backbone)
    assert reached == grad


@pytest.mark.parametrize("kind,groups", [("grouped", [5]), ("summed", [1])])
def test_condconv_matches_a_per_image_reference(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                groups: list[int]) -> None:
    """Outputs and gradients (input, expert kernels, router gate) equal a per-image loop that mixes
    each image's kernel and convolves it alone, in both forms; each runs ONE convolution (grouped:
    one group per image; summed: all expert kernels at once)."""
    torch.manual_seed(0)
    conv = CondConv2d(6, 10, num_experts=3, kind=kind)
    x = torch.randn(5, 6, 9, 9, requires_grad=True)
    g = torch.randn(5, 10, 9, 9)
    calls = []
    real_conv2d = F.conv2d

    def counting_conv2d(*args, **kwargs):
        calls.append(kwargs.get("groups", args[6] if len(args) > 6 else 1))
        return real_conv2d(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counting_conv2d)
    got = conv(x)
    monkeypatch.setattr(F, "conv2d", real_conv2d)
    assert calls == groups
    (got * g).sum().backward()
    grads = [x.grad, conv.weight_EOI33.grad, conv.router.gate.weight.grad]
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight_EOI33.detach().clone().requires_grad_(True)
    gate_ref = conv.router.gate.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(x_ref.mean(dim=(-2, -1)) @ gate_ref.T, -1)
    outputs = []
    for b in range(5):
        kernel = sum(probs[b, e] * w_ref[e] for e in range(3))
        outputs.append(F.conv2d(x_ref[b:b + 1], kernel, padding=1))
    want = torch.cat(outputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    (want * g).sum().backward()
    for grad, ref in zip(grads, [x_ref.grad, w_ref.grad, gate_ref.grad], strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)


def test_condconv_takes_the_form_measured_faster_for_its_expert_count() -> None:
    """Up to SUMMED_MAX_EXPERTS kernels the summed form, beyond it the grouped one; a form that does
    not exist is refused by name."""
    assert [CondConv2d(4, 4, e).kind for e in (1, 2, 4, 5, 8)] == ["summed"] * 3 + ["grouped"] * 2
    with pytest.raises(ValueError, match="kind must be one of grouped, summed"):
        CondConv2d(4, 4, 2, kind="fft")


def test_whitening_decorrelates_patches() -> None:
    model = build_model(ModelConfig(model="dense", **SMALL))
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(256, 3, 8, 8, generator=g), size=32, mode="bilinear") * 255
    images = smooth.to(torch.uint8)
    model.fit_whitening(images)
    with torch.no_grad():
        h = F.conv2d(model.normalise(images), model.whiten.weight)  # no bias
    half = model.whiten.width // 2
    feats = h[:, :half].permute(0, 2, 3, 1).reshape(-1, half).double()
    cov = torch.cov(feats.T)
    torch.testing.assert_close(torch.diagonal(cov), torch.ones(half, dtype=torch.float64), rtol=0.05, atol=0.05)
    assert (cov - torch.diag(torch.diagonal(cov))).abs().max() < 0.05
    torch.testing.assert_close(h[:, half:], -h[:, :half])


@pytest.mark.parametrize("changes,message", [
    (dict(top_k=5, num_experts=4), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(model="condconv", top_k=5, num_experts=4), "top_k"),  # condconv mixes all E, yet k > E is no config
    (dict(expert_stages=(3,)), "expert stage"),
    (dict(model="mlp"), "model must be"),
    (dict(expert_core=1), "expert_core must be true or false"),
    (dict(expert_width=0), "expert_width"),
    (dict(model="condconv", expert_width=64), "not condconv"),
    (dict(router="switch"), "router .--router. must be one of topk, gumbel"),
    (dict(router="gumbel", num_experts=4, top_k=2), "needs top_k"),
])
def test_impossible_model_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_impossible_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="epochs"):
        RecipeConfig(epochs=0)
    with pytest.raises(ValueError, match="top_k"):
        with_overrides(get_preset("smoke"), top_k=9)
    with pytest.raises(ValueError, match="validation"):
        VisionConfig(validation=100, train_limit=50)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_config_round_trips_through_json() -> None:
    import json

    config = with_overrides(get_preset("smoke"), model="condconv", num_experts=3, seed=7)
    assert VisionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_saved_recipe_from_before_router_input_grad_resumes_with_the_gradient() -> None:
    raw = get_preset("smoke").to_dict()
    assert raw["recipe"].pop("router_input_grad") is False  # the default now
    assert VisionConfig.from_dict(raw).recipe.router_input_grad is True
    assert VisionConfig.from_dict({"preset": "smoke"}).recipe.router_input_grad is False


def test_a_saved_model_from_before_expert_core_has_no_core_and_its_checkpoints_still_match() -> None:
    from dataclasses import replace

    from moe_apps.vision.train import model_config_dict

    raw = get_preset("smoke").to_dict()
    assert raw["model"].pop("expert_core") is False  # the default
    assert raw["model"].pop("expert_width") is None  # the default, added later still
    assert raw["model"].pop("router") == "topk"  # likewise
    old = VisionConfig.from_dict(raw)
    assert old.model.expert_core is False and build_model(old.model).groups[2].core is None
    assert model_config_dict(old) == raw["model"]  # what its checkpoints recorded
    cored = replace(old, model=replace(old.model, expert_core=True))
    assert model_config_dict(cored)["expert_core"] is True
    assert "expert_width" not in model_config_dict(old)  # nor is expert_width, unless set
    narrow = replace(old, model=replace(old.model, num_experts=4, top_k=2, expert_width=8))
    assert model_config_dict(narrow)["expert_width"] == 8
    assert model_config_dict(replace(old, model=replace(old.model, router="gumbel")))["router"] == "gumbel"


def test_expert_core_experts_start_identical_and_read_core_plus_residual() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="moe", expert_core=True, **SMALL))
    stage = model.groups[2]
    first, second = stage.moe.experts.experts
    assert torch.equal(first.conv1.weight, second.conv1.weight)
    assert torch.equal(first.conv2.weight, stage.core.cores[1])
    with torch.no_grad():
        second.conv1.parametrizations.weight.original.fill_(0.5)
    torch.testing.assert_close(second.conv1.weight, stage.core.cores[0] + 0.5)
    assert torch.equal(first.conv1.weight, stage.core.cores[0])


def test_moe_with_an_expert_core_trains_and_its_run_loads(cifar_data, tmp_path) -> None:
    from dataclasses import replace

    from moe_apps.vision.train import load_run, train

    config = get_preset("smoke")
    config = replace(config, model=replace(config.model, expert_core=True))
    outcome = train(config, tmp_path / "core", data_dir=cifar_data, progress=False, evaluate=False)
    assert outcome.val_metrics["accuracy"] > 0.3  # 10 synthetic classes: chance is 0.1
    stage = load_run(tmp_path / "core").model.groups[2]
    first, second = stage.moe.experts.experts
    assert not torch.equal(first.conv1.weight, second.conv1.weight)  # the residuals learned


@pytest.mark.parametrize("model_name", ["condconv", "dense"])
def test_other_models_train_and_learn(model_name: str, cifar_data, tmp_path) -> None:
    from moe_apps.vision.train import train

    config = with_overrides(get_preset("smoke"), model=model_name, epochs=2)
    outcome = train(config, tmp_path / model_name, data_dir=cifar_data, progress=False, evaluate=False)
    assert outcome.val_metrics["accuracy"] > 0.3  # 10 synthetic classes: chance is 0.1


@pytest.mark.parametrize("grad", [True, False])
def test_prepare_model_takes_the_recipes_router_input_grad(grad: bool, cifar_data) -> None:
    from dataclasses import replace

    from moe_apps.vision.data import make_splits
    from moe_apps.vision.train import prepare_model

    config = get_preset("smoke")
    config = replace(config, recipe=replace(config.recipe, router_input_grad=grad))
    assert prepare_model(config, make_splits(config, cifar_data)).router_input_grad is grad


@pytest.mark.parametrize("model_name,core,scale", [
    ("moe", False, 4.0), ("moe", True, 4.0), ("condconv", False, 4.0), ("dense", False, 1.0)])
def test_param_groups_cover_every_parameter_once(model_name: str, core: bool, scale: float) -> None:
    from moe_apps.vision.train import expert_lr_scale, param_groups

    config = ModelConfig(model=model_name, num_experts=4, top_k=1, expert_core=core)
    model = build_model(config)
    assert expert_lr_scale(config) == scale
    recipe = RecipeConfig()
    groups = {g["name"]: g for g in param_groups(recipe, scale)(model)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable)  # each trainable parameter in exactly one group
    assert groups["norm_biases"]["lr_scale"] == recipe.bias_lr_scale
    for g in groups.values():  # lr x L2 the same in every group but the routers
        if g["name"] != "routers":
            assert g["lr_scale"] * g["weight_decay"] == pytest.approx(recipe.weight_decay)
    if model_name == "dense":
        assert set(groups) == {"weights", "norm_biases"}
    else:
        assert groups["expert_weights"]["lr_scale"] == scale and groups["routers"]["lr_scale"] == recipe.router_lr_scale
    if model_name == "moe":
        assert groups["expert_norm_biases"]["lr_scale"] == recipe.bias_lr_scale * scale
        conv = model.groups[2].moe.experts.experts[3].conv1
        expert_param = conv.parametrizations.weight.original if core else conv.weight
        assert any(p is expert_param for p in groups["expert_weights"]["params"])
    if core:  # the core learns from every image: a dense weight, at the backbone's lr
        assert any(p is model.groups[2].core.cores[0] for p in groups["weights"]["params"])
    assert expert_lr_scale(ModelConfig(model="moe", num_experts=8, top_k=2)) == 4.0


def test_eval_report_per_class_accuracy_by_hand() -> None:
    """Per-class accuracy against a hand count; a class without test images is None, not 0."""
    from moe_apps.vision.data import Split
    from moe_apps.vision.task import Predictions
    from moe_apps.vision.train import eval_report

    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 1, 0, 1, 0, 2])
    probs = torch.nn.functional.one_hot(predicted, 4).float()
    report = eval_report(Predictions(probs, {}), Split(torch.zeros(6, 3, 32, 32, dtype=torch.uint8), labels),
                         ["a", "b", "c", "d"], 2, tta=False)
    assert report["per_class_accuracy"] == {"a": 2 / 3, "b": 1.0, "c": 0.5, "d": None}
    assert report["accuracy"] == 4 / 6


def test_channels_last_grad_is_identity_with_a_channels_last_gradient() -> None:
    from moe_apps.vision.model import channels_last_grad

    leaf = torch.randn(2, 3, 4, 5).requires_grad_()
    x = (leaf * 2).contiguous(memory_format=torch.channels_last)
    received = []
    x.register_hook(received.append)  # the gradient channels_last_grad hands back to x
    y = channels_last_grad(x)
    assert torch.equal(y, x)
    upstream = torch.randn(2, 3, 4, 5)  # contiguous NCHW, as a concatenation hands it back
    y.backward(upstream)
    assert torch.equal(received[0], upstream) and torch.equal(leaf.grad, 2 * upstream)
    assert received[0].is_contiguous(memory_format=torch.channels_last)
