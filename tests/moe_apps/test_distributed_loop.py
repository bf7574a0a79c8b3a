"""The shared training loop under 2 gloo processes (torchrun's environment, `distributed_problem`):
an expert-parallel model (experts split over the ranks, DDP for the rest) trains like one process
with the same global batch; its checkpoints hold the full one-process state, load in one process
and resume at the other world size with the optimizer's moments.

Tolerance: TOL on every step's loss and 1e-6 on outputs (fp32; the ranks sum partial sums in
another order than one process, and Adam's early steps amplify differences of 1e-7)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from distributed_problem import (
    APP,
    MODEL_CONFIG,
    STEPS_PER_EPOCH,
    Task,
    TinyEP,
    probe,
    spawn,
    train,
)

from moe_apps.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

WORLD, TOL, CUT = 2, 1e-5, 4
TOTAL = 3 * STEPS_PER_EPOCH  # 3 epochs


def _cut(run_dir: Path, world: int, merge: int = 1) -> None:
    """Train until step CUT + 1 starts, then crash (last.pt holds step CUT)."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run_dir, world, Task(crash_at=CUT + 1), merge=merge)


def _two_processes(rank: int, world: int, out: str) -> None:
    out_dir = Path(out)
    task = Task()
    model = train(out_dir / "two", world, task)
    model.eval()
    with torch.no_grad():
        outputs = model(probe())
    results = {"losses": task.losses, "probe": outputs, "pid": os.getpid()}
    try:
        train(out_dir / "two_cut", world, Task(crash_at=CUT + 1))
    except RuntimeError as error:
        results["crash"] = str(error)
    task = Task()
    train(out_dir / "one_cut", world, task, resume=True)
    results["resumed_losses"] = task.losses
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distributed_loop")
    _cut(out / "one_cut", 1, merge=WORLD)
    spawn(_two_processes, WORLD, str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    whole = Task()
    train(out / "one", 1, whole, merge=WORLD)
    # a copy of the 2-process cut run without Adam's moments: the control that must NOT match
    shutil.copytree(out / "two_cut", out / "no_moments")
    last = out / "no_moments" / "checkpoints" / "last.pt"
    state = read_checkpoint(last)
    state["optimizer"] = dict(state["optimizer"], state={})
    save_checkpoint(last, {k: v for k, v in state.items() if k not in ("format_version", "sha256")})
    resumed, control = Task(), Task()
    train(out / "two_cut", 1, resumed, resume=True, merge=WORLD)
    train(out / "no_moments", 1, control, resume=True, merge=WORLD)
    return {"out": out, "ranks": ranks, "one": whole.losses, "resumed_in_one": resumed.losses,
            "control": control.losses}


def _mean_over_ranks(ranks: list[dict], key: str) -> list[float]:
    return [sum(values) / len(values) for values in zip(*(r[key] for r in ranks), strict=True)]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    one, two = runs["one"], _mean_over_ranks(runs["ranks"], "losses")
    assert len(one) == TOTAL
    assert _max_diff(two, one) <= TOL, (two, one)
    assert one[-1] < 0.8 * one[0]  # it does learn
    # the logged epoch means (loss + aux, averaged over the ranks) agree as well
    rows = {name: [json.loads(line) for line in (runs["out"] / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert len(rows["two"]) == 3
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= TOL and abs(a["val_loss"] - b["val_loss"]) <= TOL


def test_checkpoint_saved_by_two_processes_loads_in_one(runs):
    out = runs["out"]
    last = read_checkpoint(out / "two" / "checkpoints" / "last.pt")
    plain = TinyEP()
    assert list(last["model"]) == list(plain.state_dict())  # one-process keys, every expert
    assert last["model"]["moe.experts.w_in"].shape[0] == 4
    moments = last["optimizer"]["state"]
    w_in = list(plain.state_dict()).index("moe.experts.w_in")  # parameter order = state-dict order here
    assert moments[w_in]["exp_avg"].shape == last["model"]["moe.experts.w_in"].shape
    load_checkpoint(out / "two" / "checkpoints" / "best.pt", plain, app=APP, model_config=MODEL_CONFIG)
    plain.eval()
    with torch.no_grad():
        expected = plain(probe())
    for rank in runs["ranks"]:  # the 2-process model after fit (best = EMA weights), on the probe
        assert (rank["probe"] - expected).abs().max() <= 1e-6
    one = read_checkpoint(out / "one" / "checkpoints" / "best.pt")["model"]
    two = read_checkpoint(out / "two" / "checkpoints" / "best.pt")["model"]
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-4


def test_resume_in_one_process_from_two(runs):
    assert all(r["crash"] == "simulated crash" for r in runs["ranks"])
    assert _max_diff(runs["resumed_in_one"], runs["one"][CUT:]) <= TOL


def test_resume_in_two_processes_from_one(runs):
    assert _max_diff(_mean_over_ranks(runs["ranks"], "resumed_losses"), runs["one"][CUT:]) <= TOL


def test_resume_without_the_optimizer_moments_would_not_match(runs):
    assert _max_diff(runs["control"], runs["one"][CUT:]) > 100 * TOL


def test_only_rank_zero_holds_the_run_folder(runs):
    lock = (runs["out"] / "two" / ".lock").read_text().strip()
    assert lock == str(runs["ranks"][0]["pid"])
    assert sorted(p.name for p in (runs["out"] / "two" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
