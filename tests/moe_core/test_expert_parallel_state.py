"""Training and checkpoints across world sizes: 2 gloo processes (expert parallel, or data parallel
with replicated experts) against one process, Adam, the same global batch; checkpoints saved with
2 processes load in 1 and the reverse, and resumed training continues the uninterrupted run.

Tolerance: LOSS_TOL on the loss of each step (fp32; the group sums partial sums in another order,
and Adam's first steps amplify differences of 1e-7 in the gradients)."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_group
from expert_parallel_training import (
    LR,
    MODES,
    SAVE_AT,
    STEPS,
    batch,
    build,
    losses,
    train_one_process,
    train_worker,
)

WORLD = 2
LOSS_TOL = 1e-5


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=LR)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("expert_parallel_state")
    model = build("ep")
    optimizer = _adam(model)
    train_one_process(model, optimizer, range(SAVE_AT))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "one_ckpt.pt")
    with torch.no_grad():
        one_probe = model(batch(999)[0])
    run_group(train_worker, WORLD, str(out))
    group = [torch.load(out / f"train_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    uninterrupted = {}
    for mode in MODES:
        model = build(mode)
        uninterrupted[mode] = train_one_process(model, _adam(model), range(STEPS))
    ep_ckpt = torch.load(out / "ep_ckpt.pt", weights_only=True)
    return {"group": group, "one_probe": one_probe, "uninterrupted": uninterrupted, "ep_ckpt": ep_ckpt}


def _close(a, b, tol=LOSS_TOL):
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol, (a, b)


@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_train_like_one(runs, mode):
    for rank_results in runs["group"]:
        _close(rank_results[f"{mode}_losses"], runs["uninterrupted"][mode])
    first, last = runs["uninterrupted"][mode][0], runs["uninterrupted"][mode][-1]
    assert abs(first - last) > 100 * LOSS_TOL  # the steps do change the model


@pytest.mark.parametrize("mode", list(MODES))
def test_synchronised_gradients_are_the_one_process_ones(runs, mode):
    """Adam hides a constant factor on a gradient, so the gradients of step 0 are compared too:
    dense ones on every rank, split experts put together in rank order."""
    model = build(mode)
    task, aux = losses(model, *batch(0))
    (task + aux).backward()
    for name, param in model.named_parameters():
        parts = [r[f"{mode}_grads"][name] for r in runs["group"]]
        if name.startswith("moe.experts.") and mode != "dp":
            parts = [torch.cat(parts)]
        for part in parts:
            torch.testing.assert_close(part, param.grad, atol=1e-6, rtol=1e-5)


def test_checkpoint_holds_every_expert_by_global_index(runs):
    """The 2-process checkpoint is the one-process checkpoint of the same training."""
    model = build("ep")
    optimizer = _adam(model)
    train_one_process(model, optimizer, range(SAVE_AT))
    saved = runs["ep_ckpt"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(saved["model"][key], value, atol=1e-5, rtol=0)
    moments = optimizer.state_dict()["state"]
    for index, entry in moments.items():
        for name, value in entry.items():
            torch.testing.assert_close(saved["optimizer"]["state"][index][name], value, atol=1e-5, rtol=1e-4)
    assert saved["model"]["moe.experts.w_in"].shape[0] == 4


def test_save_with_two_load_with_one(runs):
    model = build("ep")
    model.load_state_dict(runs["ep_ckpt"]["model"])
    with torch.no_grad():
        probe = model(batch(999)[0])
    group_probe = torch.cat([r["ep_probe"] for r in runs["group"]])
    torch.testing.assert_close(probe, group_probe, atol=1e-5, rtol=0)
    optimizer = _adam(model)
    optimizer.load_state_dict(runs["ep_ckpt"]["optimizer"])
    _close(train_one_process(model, optimizer, range(SAVE_AT, STEPS)), runs["uninterrupted"]["ep"][SAVE_AT:])


def test_resume_without_optimizer_moments_diverges(runs):
    """The resume tests can fail: fresh Adam moments give other losses than the uninterrupted run."""
    model = build("ep")
    model.load_state_dict(runs["ep_ckpt"]["model"])
    resumed = train_one_process(model, _adam(model), range(SAVE_AT, STEPS))
    expected = runs["uninterrupted"]["ep"][SAVE_AT:]
    assert max(abs(x - y) for x, y in zip(resumed, expected, strict=True)) > 100 * LOSS_TOL


def test_save_with_one_load_with_two(runs):
    group_probe = torch.cat([r["resumed_probe"] for r in runs["group"]])
    torch.testing.assert_close(group_probe, runs["one_probe"], atol=1e-5, rtol=0)
    for rank_results in runs["group"]:
        _close(rank_results["resumed_losses"], runs["uninterrupted"]["ep"][SAVE_AT:])


def test_checkpoint_of_another_model_is_refused(runs):
    message = runs["group"][0]["wrong_model"]
    assert message is not None and "moe.experts.w_in" in message and "another model" in message


def test_experts_held_by_several_groups_need_their_replica_group(runs):
    """Experts split over groups smaller than the world are held by several groups: averaging
    their gradients without the replica group would silently halve them and let the copies drift."""
    message = runs["group"][0]["no_replica_group"]
    assert message is not None and "replica_group" in message and "expert_parallel_groups" in message
