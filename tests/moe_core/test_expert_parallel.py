"""Expert parallelism: 2 gloo processes against the one-process `MoE` with the same weights and
inputs (outputs, input / router / expert / shared-expert gradients, aux losses, stats), within 1e-5
in fp32. One spawn of 2 processes runs every layer scenario (tests/moe_core/distributed_helpers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import (
    SCENARIOS,
    D,
    layer_worker,
    reshape_tokens,
    run_group,
    scenario_inputs,
)
from torch import nn

from moe_core import ExpertBank, TopKRouter
from moe_core.expert_parallel import ExpertParallelMoE, local_expert_range, shard_expert_bank

WORLD = 2
TOL = {"atol": 1e-5, "rtol": 0.0}
TOKEN_CHOICE = [name for name in SCENARIOS if name != "expert_choice"]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("expert_parallel")
    run_group(layer_worker, WORLD, list(SCENARIOS), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _one_process(name: str):
    """The reference: the one-process layer on the ranks' batches concatenated in rank order, loss
    ``sum(out * g) + sum(aux)`` (the sum of the ranks' losses)."""
    layer, x, g, _, aux_in_loss = scenario_inputs(name)
    x = x.clone().requires_grad_(True)
    x_in, mask, ids = reshape_tokens(name, x)
    out = layer(x_in, token_mask=mask, token_ids=ids)
    loss = (out.output.reshape(-1, D) * g).sum()
    if aux_in_loss:
        loss = loss + sum(out.aux_losses.values())
    loss.backward()
    return layer, x, out


def _cat(results, name, key):
    return torch.cat([r[name][key] for r in results])


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_outputs_and_gradients_match_one_process(group_results, name):
    layer, x, out = _one_process(name)
    torch.testing.assert_close(_cat(group_results, name, "output"), out.output.detach().reshape(-1, D), **TOL)
    torch.testing.assert_close(_cat(group_results, name, "x_grad"), x.grad, **TOL)
    for pname, param in layer.router.named_parameters():  # replicated: the ranks' grads sum up
        total = sum(r[name]["router_grads"][pname] for r in group_results)
        torch.testing.assert_close(total, param.grad, **TOL)
    for pname, param in layer.experts.named_parameters():  # split: each rank holds its experts' grads
        parts = [r[name]["expert_grads"][pname] for r in group_results]
        torch.testing.assert_close(torch.cat(parts), param.grad, **TOL)
    if layer.shared_experts is not None:
        for pname, param in layer.shared_experts.named_parameters():
            total = sum(r[name]["shared_grads"][pname] for r in group_results)
            torch.testing.assert_close(total, param.grad, **TOL)


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_aux_losses_and_stats_are_the_groups(group_results, name):
    _, _, out = _one_process(name)
    for r in group_results:
        assert set(r[name]["aux"]) == set(out.aux_losses)
        for key, value in out.aux_losses.items():
            torch.testing.assert_close(r[name]["aux"][key], value.detach(), **TOL)
        stats = r[name]["stats"]
        assert torch.equal(stats.tokens_per_expert_E, out.stats.tokens_per_expert_E)
        assert stats.dropped_fraction == pytest.approx(out.stats.dropped_fraction, abs=1e-12)
        assert stats.entropy == pytest.approx(out.stats.entropy, abs=1e-6)
        assert stats.load_cv == pytest.approx(out.stats.load_cv, abs=1e-9)
        assert stats.dead_experts == out.stats.dead_experts


def test_scenarios_exercise_what_they_name(group_results):
    """Capacity drops slots, one rank has no tokens, one rank's experts receive none."""
    assert _one_process("topk_capacity")[2].stats.dropped_fraction > 0
    assert _one_process("switch")[2].stats.dropped_fraction > 0
    assert group_results[1]["empty_rank"]["output"].shape == (0, D)
    idle = _one_process("idle_experts")[2].stats.tokens_per_expert_E
    assert idle[2:].sum() == 0 and idle[:2].sum() > 0
    assert group_results[1]["idle_experts"]["expert_range"] == range(2, 4)
    assert all(g.abs().sum() == 0 for g in group_results[1]["idle_experts"]["expert_grads"].values())


def test_expert_choice_is_per_rank(group_results):
    """Expert choice: each expert takes its top-C of each rank's batch = the one-process layer on
    each rank's tokens alone."""
    layer, x, g, sizes, _ = scenario_inputs("expert_choice")
    start = 0
    for rank, size in enumerate(sizes):
        x_r = x[start : start + size].clone().requires_grad_(True)
        out = layer(x_r)
        (out.output * g[start : start + size]).sum().backward()
        torch.testing.assert_close(group_results[rank]["expert_choice"]["output"], out.output.detach(), **TOL)
        torch.testing.assert_close(group_results[rank]["expert_choice"]["x_grad"], x_r.grad, **TOL)
        start += size
    for pname, param in layer.experts.named_parameters():  # accumulated over both rank batches
        parts = [r["expert_choice"]["expert_grads"][pname] for r in group_results]
        torch.testing.assert_close(torch.cat(parts), param.grad, **TOL)


def test_bf16_weights_and_tokens(group_results):
    """bf16 experts and tokens travel as bf16 and match the one-process bf16 layer to bf16 rounding."""
    layer, x, g, _, _ = scenario_inputs("topk_capacity")
    layer = layer.to(torch.bfloat16)
    x = x.bfloat16().requires_grad_(True)
    out = layer(x)
    (out.output.float() * g).sum().backward()
    output = _cat(group_results, "bf16", "output")
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, out.output.detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(_cat(group_results, "bf16", "x_grad"), x.grad, atol=2e-2, rtol=2e-2)


def test_world_size_must_divide_the_experts(group_results):
    message = group_results[0]["bad_world"]
    assert message is not None and "num_experts=3 is not divisible by the process group size 2" in message
    with pytest.raises(ValueError, match="not divisible"):
        local_expert_range(6, 4, 0)
    assert local_expert_range(8, 4, 3) == range(6, 8)


def test_benchmark_prints_one_json_object():
    """benchmarks/expert_parallel.py end to end on a tiny problem (2 processes against 1)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "expert_parallel.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tokens", "32", "--d-model", "8", "--d-hidden", "8", "--experts", "4",
         "--capacity-factor", "1.0", "--steps", "1", "--warmup", "0", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["tokens_per_s"]) == set(report["all_to_all_share"]) == {"1", "2"}
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert report["all_to_all_share"]["1"] == 0.0 and 0 < report["all_to_all_share"]["2"] < 1
    assert set(report["grads_max_abs_diff_by"]) == {"input", "router", "experts"}
    for key in ("outputs_max_abs_diff", "grads_max_abs_diff", "checkpoint_2to1_max_abs_diff"):
        assert report[key] <= 1e-5, (key, report[key])


def test_bad_construction_is_one_clear_error():
    """Checked in this process (no process group here): causal + capacity, then the missing group."""
    router, bank = TopKRouter(D, 4), ExpertBank(2, D, 4)
    with pytest.raises(ValueError, match=r"causal=True\) needs capacity_factor=None"):
        ExpertParallelMoE(router, bank, num_experts=4, capacity_factor=1.0, causal=True)
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        ExpertParallelMoE(router, bank, num_experts=4)
    with pytest.raises(ValueError, match="ExpertBank .FFN. experts only"):
        shard_expert_bank(nn.Linear(D, D), range(0, 1))
