"""Expert parallelism over sub-groups (GShard's 2-D layout, Lepikhin et al. 2020): 4 gloo
processes as 2 expert-parallel groups of 2, each group holding all 4 experts, replicas across the
groups. Capacity and aux losses are each group's (its 8 of the 16 tokens), so the reference is
the one-process model on each group's tokens, losses averaged over the 2 groups: the synchronised
gradients, and the full checkpoint (weights, momentum buffers) after one step, must equal it."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_group
from expert_parallel_training import BATCH, LR, batch, build, losses, subgroup_worker

WORLD, GROUPS = 4, 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("expert_parallel_groups")
    run_group(subgroup_worker, WORLD, str(out), timeout=300.0)
    return [torch.load(out / f"subgroup_rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """One process: mean over the 2 groups of (task + aux) on that group's 8 tokens; one step."""
    model = build("ep")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = batch(0)
    tokens = BATCH // GROUPS
    optimizer.zero_grad()
    for g in range(GROUPS):
        task, aux = losses(model, x[g * tokens : (g + 1) * tokens], y[g * tokens : (g + 1) * tokens])
        ((task + aux) / GROUPS).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return model, optimizer, grads


def test_each_rank_holds_its_experts_by_global_index(ranks):
    assert [r["expert_range"] for r in ranks] == [range(0, 2), range(2, 4), range(0, 2), range(2, 4)]


def test_synchronised_gradients_equal_one_process(ranks, reference):
    _, _, grads = reference
    for r in ranks:
        for name, grad in r["grads"].items():
            want = grads[name]
            if name.startswith("moe.experts."):  # this rank's experts only
                want = want[r["expert_range"].start : r["expert_range"].stop]
            torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5, msg=name)


def test_full_checkpoint_after_a_step_equals_one_process(ranks, reference):
    model, optimizer, _ = reference
    moments = optimizer.state_dict()["state"]
    for r in ranks:
        saved = r["state"]
        assert saved["model"]["moe.experts.w_in"].shape[0] == 4
        for key, value in model.state_dict().items():
            torch.testing.assert_close(saved["model"][key], value, atol=1e-6, rtol=0, msg=key)
        for index, entry in moments.items():
            for name, value in entry.items():
                torch.testing.assert_close(saved["optimizer"]["state"][index][name], value, atol=1e-6,
                                           rtol=1e-5, msg=f"{index}.{name}")
