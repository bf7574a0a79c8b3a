"""MMoE / CGC / PLE (moe_core.multigate) against independent per-task, per-expert Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from moe_core.experts import ConvExperts, ExpertBank
from moe_core.losses import collect_aux_losses
from moe_core.multigate import CGC, PLE, MMoE, MultiGateOutput, mlp_experts


def _softmax_by_hand(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [v / sum(exps) for v in exps]


def _mlp_by_hand(expert: nn.Sequential, x_D: Tensor) -> Tensor:
    """One MLP expert on one input vector, layer by layer from its weights."""
    h = x_D
    for layer in expert:
        if isinstance(layer, nn.Linear):
            h = layer.weight @ h + layer.bias
        elif isinstance(layer, nn.ReLU):
            h = torch.clamp(h, min=0.0)
        else:
            h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return h


def _gate_by_hand(weight_ED: Tensor, x_D: Tensor) -> list[float]:
    return _softmax_by_hand(
        [float((weight_ED[e] @ x_D).detach()) for e in range(weight_ED.shape[0])]
    )


def _mix(gate: list[float], ys: list[Tensor]) -> Tensor:
    out = torch.zeros_like(ys[0])
    for g, y in zip(gate, ys, strict=True):
        out = out + g * y
    return out


def _mmoe_reference(model: MMoE, expert_fn, x_BD: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    outputs, gates = [], []
    for gate in model.gates:
        rows, grows = [], []
        for b in range(x_BD.shape[0]):
            g = _gate_by_hand(gate.weight, x_BD[b])
            ys = [expert_fn(e, x_BD[b]) for e in range(model.num_experts)]
            rows.append(_mix(g, ys))
            grows.append(torch.tensor(g, dtype=x_BD.dtype))
        outputs.append(torch.stack(rows))
        gates.append(torch.stack(grows))
    return outputs, gates


def test_mmoe_matches_loop_with_mlp_experts() -> None:
    torch.manual_seed(0)
    model = MMoE.from_sizes(d_in=5, d_expert=3, num_experts=4, num_tasks=3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    out = model(x)
    assert isinstance(out, MultiGateOutput)
    ref_out, ref_gates = _mmoe_reference(
        model, lambda e, v: _mlp_by_hand(model.experts.experts[e], v), x
    )
    assert len(out.task_outputs) == 3 and len(out.gate_weights) == 3
    for t in range(3):
        assert out.task_outputs[t].shape == (6, 3)
        torch.testing.assert_close(out.task_outputs[t], ref_out[t])
        torch.testing.assert_close(out.gate_weights[t], ref_gates[t])


def test_mmoe_matches_loop_with_expert_bank_and_two_layer_experts() -> None:
    torch.manual_seed(1)
    bank = ExpertBank(3, 4, 6, activation="relu", bias=True).double()
    model = MMoE(4, bank, num_tasks=2).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def bank_expert(e: int, v: Tensor) -> Tensor:
        return torch.clamp(v @ bank.w_in[e] + bank.b_in[e], min=0.0) @ bank.w_out[e] + bank.b_out[e]

    ref_out, _ = _mmoe_reference(model, bank_expert, x)
    out = model(x)
    for t in range(2):
        torch.testing.assert_close(out.task_outputs[t], ref_out[t])

    deep = MMoE.from_sizes(4, 2, 3, 2, activation="gelu", d_hidden=5).double()
    ref_deep, _ = _mmoe_reference(deep, lambda e, v: _mlp_by_hand(deep.experts.experts[e], v), x)
    for t in range(2):
        torch.testing.assert_close(deep(x).task_outputs[t], ref_deep[t])


def test_mmoe_leading_dims_float32_and_aux_loss() -> None:
    torch.manual_seed(2)
    model = MMoE.from_sizes(4, 3, 5, 2)
    x = torch.randn(2, 3, 4)
    out = model(x)
    flat = model(x.reshape(6, 4))
    for t in range(2):
        assert out.task_outputs[t].shape == (2, 3, 3) and out.gate_weights[t].shape == (2, 3, 5)
        torch.testing.assert_close(out.task_outputs[t].reshape(6, 3), flat.task_outputs[t])
        torch.testing.assert_close(out.gate_weights[t].sum(-1), torch.ones(2, 3))
    # importance = mean over gates of CV(sum_b g_b)^2 with the population std, by hand
    cvs = []
    for g in flat.gate_weights:
        imp = g.detach().sum(0)
        cvs.append(float(((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2))
    assert flat.aux_losses["importance"].item() == pytest.approx(sum(cvs) / len(cvs), rel=1e-5)
    assert collect_aux_losses(nn.Sequential(model)).keys() == {"importance"}
    assert len(model.last_gate_weights) == 2 and not model.last_gate_weights[0].requires_grad


def _ple_reference(model: PLE, x_BD: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """PLE by hand: per level, per branch, per sample, per expert; documented expert order."""
    T = model.num_tasks
    task_in = [x_BD] * T
    shared_in = x_BD
    for level in model.levels:
        Et, Es = level.num_task_experts, level.num_shared_experts
        experts = level.experts.experts
        owner = [t for t in range(T) for _ in range(Et)] + [None] * Es

        def run(i: int, b: int, task_in=task_in, shared_in=shared_in, experts=experts, owner=owner):
            source = shared_in if owner[i] is None else task_in[owner[i]]
            return _mlp_by_hand(experts[i], source[b])

        new_task, gates = [], []
        for t in range(T):
            ids = [t * Et + j for j in range(Et)] + [T * Et + j for j in range(Es)]
            rows, grows = [], []
            for b in range(x_BD.shape[0]):
                g = _gate_by_hand(level.task_gates[t].weight, task_in[t][b])
                rows.append(_mix(g, [run(i, b) for i in ids]))
                grows.append(torch.tensor(g, dtype=x_BD.dtype))
            new_task.append(torch.stack(rows))
            gates.append(torch.stack(grows))
        new_shared = None
        if level.shared_gate is not None:
            rows = []
            for b in range(x_BD.shape[0]):
                g = _gate_by_hand(level.shared_gate.weight, shared_in[b])
                rows.append(_mix(g, [run(i, b) for i in range(len(owner))]))
            new_shared = torch.stack(rows)
        task_in, shared_in = new_task, new_shared
    return task_in, gates


@pytest.mark.parametrize(
    ("num_levels", "num_shared", "num_task"),
    [(1, 2, 2), (2, 2, 2), (3, 1, 2), (2, 0, 2), (2, 2, 0)],
)
def test_ple_matches_loop(num_levels: int, num_shared: int, num_task: int) -> None:
    torch.manual_seed(3)
    model = PLE(
        4,
        3,
        num_tasks=2,
        num_levels=num_levels,
        num_shared_experts=num_shared,
        num_task_experts=num_task,
    ).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    out = model(x)
    ref_out, ref_gates = _ple_reference(model, x)
    for t in range(2):
        assert out.task_outputs[t].shape == (5, 3)
        assert out.gate_weights[t].shape == (5, num_shared + num_task)
        torch.testing.assert_close(out.task_outputs[t], ref_out[t])
        torch.testing.assert_close(out.gate_weights[t], ref_gates[t])
        torch.testing.assert_close(out.gate_weights[t].sum(-1), torch.ones(5, dtype=torch.float64))
    has_shared_gate = [lvl.shared_gate is not None for lvl in model.levels]
    assert has_shared_gate == [i < num_levels - 1 and num_shared > 0 for i in range(num_levels)]


def test_ple_level_widths_leading_dims_float32() -> None:
    torch.manual_seed(4)
    model = PLE(6, 4, num_tasks=3, num_levels=2, d_hidden=5)
    assert [lvl.d_in for lvl in model.levels] == [6, 4]
    assert model.levels[0].shared_gate.out_features == 3 * 2 + 2
    out = model(torch.randn(2, 7, 6))
    assert [o.shape for o in out.task_outputs] == [(2, 7, 4)] * 3
    assert out.aux_losses["importance"].dim() == 0 and model.last_aux_losses is out.aux_losses


@pytest.mark.parametrize("kind", ["mmoe", "ple"])
def test_gradients_reach_every_gate_and_expert(kind: str) -> None:
    torch.manual_seed(5)
    if kind == "mmoe":
        model = MMoE.from_sizes(4, 3, 3, 2)
    else:
        model = PLE(4, 3, num_tasks=2, num_levels=3, num_shared_experts=1, num_task_experts=2)
    out = model(torch.randn(32, 4))
    loss = sum((o * torch.randn_like(o)).sum() for o in out.task_outputs)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_cgc_level_alone() -> None:
    torch.manual_seed(6)
    level = CGC(4, 3, num_tasks=2, num_shared_experts=1, num_task_experts=1, shared_gate=True)
    a, b, s = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    out = level([a, b], s)
    assert out.shared_output.shape == (3, 3) and out.shared_gate_weights.shape == (3, 3)
    # task 1's gate mixes expert 1 (its own) and expert 2 (shared), run on b and s respectively
    e1 = level.experts.experts[1](b)
    e2 = level.experts.experts[2](s)
    g = torch.softmax(b @ level.task_gates[1].weight.t(), -1)
    torch.testing.assert_close(out.task_outputs[1], g[:, :1] * e1 + g[:, 1:] * e2)


@pytest.mark.parametrize("kind", ["mmoe", "ple"])
def test_empty_batch_keeps_the_output_widths(kind: str) -> None:
    torch.manual_seed(7)
    model = MMoE.from_sizes(4, 3, 5, 2) if kind == "mmoe" else PLE(4, 3, num_tasks=2)
    out = model(torch.randn(2, 0, 4))
    gate_width = 5 if kind == "mmoe" else 4  # PLE: 2 task experts + 2 shared
    assert [o.shape for o in out.task_outputs] == [(2, 0, 3)] * 2
    assert [g.shape for g in out.gate_weights] == [(2, 0, gate_width)] * 2
    assert out.aux_losses["importance"].item() == 0.0


def test_bad_configs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_levels"):
        PLE(4, 3, 2, num_levels=0)
    with pytest.raises(ValueError, match="num_tasks"):
        PLE(4, 3, 0)
    with pytest.raises(ValueError, match="num_shared_experts"):
        PLE(4, 3, 2, num_shared_experts=-1)
    with pytest.raises(ValueError, match="at least one expert"):
        PLE(4, 3, 2, num_shared_experts=0, num_task_experts=0)
    with pytest.raises(ValueError, match="activation"):
        PLE(4, 3, 2, activation="swiglu")
    with pytest.raises(ValueError, match="num_tasks"):
        MMoE.from_sizes(4, 3, 2, num_tasks=0)
    with pytest.raises(ValueError, match="num_experts"):
        MMoE.from_sizes(4, 3, 0, 2)
    with pytest.raises(ValueError, match="forward_dense"):
        MMoE(4, nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="feature_dims"):
        MMoE(4, ConvExperts(2, 4), 2)
    with pytest.raises(ValueError, match="d_out"):
        mlp_experts(2, 4, 0)


def test_bad_inputs_raise_value_error() -> None:
    mmoe, ple = MMoE.from_sizes(4, 3, 2, 2), PLE(4, 3, 2)
    for model in (mmoe, ple):
        with pytest.raises(ValueError, match="d_model=4"):
            model(torch.randn(3, 5))
        with pytest.raises(ValueError, match="floating-point"):
            model(torch.ones(3, 4, dtype=torch.long))
    level = CGC(4, 3, 2, shared_gate=True)
    with pytest.raises(ValueError, match="num_tasks=2"):
        level([torch.randn(3, 4)], torch.randn(3, 4))
    with pytest.raises(ValueError, match="shared_input is required"):
        level([torch.randn(3, 4)] * 2, None)
    with pytest.raises(ValueError, match="shared_input must have shape"):
        level([torch.randn(3, 4)] * 2, torch.randn(2, 4))
