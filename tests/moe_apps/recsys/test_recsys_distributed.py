"""The recsys tables under torchrec's DistributedModelParallel with 2 gloo processes
(`moe_apps.recsys.distributed`), against the plain model in one process with the same weights.

One spawn of 2 processes runs every sharding type: forward on unequal local batches, two AdamW
steps of the recsys loss on equal local batches against one process on their concatenation (the
same global batch), the gathered state and optimizer state against the one-process ones, a
one-process state (weights and Adam's moments) loaded into a fresh sharded model that then steps
like one process, and two SGD steps whose gradients are clipped (the norm over every rank's
table blocks) against clipped steps in one process. Tolerance 1e-5 in fp32. Then `moe-apps recsys train --nproc 2` on a synthetic
ML-100K folder and `moe-apps recsys eval --json` of its run folder in this process.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from recsys_synthetic import hand_data
from typer.testing import CliRunner

from moe_apps.cli import app
from moe_apps.recsys.config import LIKE, RATING, ModelConfig
from moe_apps.recsys.data import build_features, make_batch
from moe_apps.recsys.distributed import SHARDING_TYPES, sharding_plan
from moe_apps.recsys.model import build_model
from moe_apps.recsys.task import RecsysTask
from moe_apps.recsys.train import read_run_config
from moe_apps.training import TrainConfig
from moe_apps.training.checkpoint import read_checkpoint
from moe_apps.training.runtime import build_optimizer

WORLD, TOL = 2, 1e-5
pytestmark = pytest.mark.timeout(600)  # a hang guard: 28 s in all on 2 cores


def _setup(seed: int = 0):
    data = hand_data()
    features = build_features(data, data.ratings)
    config = ModelConfig(embedding_dim=4, num_experts=2, expert_dim=8, tower_dim=4, dropout=0.0,
                         tasks=(LIKE, RATING), vocab=tuple(sorted(features.vocab.items())))
    torch.manual_seed(seed)
    return build_model(config), features, config


def _batch(features, config, rows: slice, draw: int):
    """Rows ``rows`` of draw ``draw``'s 16 random (user, movie, rating) triples."""
    g = torch.Generator().manual_seed(100 + draw)
    user, item = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 4, (16,), generator=g)
    rating = torch.randint(1, 6, (16,), generator=g).float().numpy()
    return make_batch(features, config.tasks, user[rows], item[rows], rating[rows])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _optimizer_diff(full: dict, ref: dict) -> float:
    assert [g["params"] for g in full["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    assert full["state"].keys() == ref["state"].keys()
    worst = 0.0
    for index, entries in ref["state"].items():
        assert full["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            worst = max(worst, float((full["state"][index][key].float() - value.float()).abs().max()))
    return worst


def _steps(net, optimizer, task, batches, clip=None) -> list[float]:
    losses = []
    for batch in batches:
        loss, _ = task.training_loss(net, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            clip()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _scenarios(rank: int, world: int, out: str) -> None:
    from moe_apps.recsys.distributed import torchrec_model_parallel
    from moe_apps.training.distributed import DistContext, clip_grad_norm_

    ctx, task = DistContext(rank, world, rank), RecsysTask((LIKE, RATING), embedding_l2=0.05)
    train = TrainConfig(lr=0.05, weight_decay=0.01, optimizer="adamw")
    results = {}
    for sharding in SHARDING_TYPES:
        model, features, config = _setup()
        ref = copy.deepcopy(model)
        dm = torchrec_model_parallel(model, ctx, sharding=sharding)
        row = {}
        # forward on unequal local batches (5 and 3 rows)
        local = _batch(features, config, slice(0, 5) if rank == 0 else slice(5, 8), draw=0)
        with torch.no_grad():
            row["forward"] = float((dm.module(local).predictions_BT - ref(local).predictions_BT).abs().max())
        # two AdamW steps: 4 rows per rank against one process on the 8 rows
        draws = (1, 2)
        optimizer, ref_optimizer = build_optimizer(model, train), build_optimizer(ref, train)
        losses = _steps(dm.module, optimizer, task,
                        [_batch(features, config, slice(4 * rank, 4 * rank + 4), d) for d in draws])
        ref_losses = _steps(ref, ref_optimizer, task, [_batch(features, config, slice(0, 8), d) for d in draws])
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, losses)
        row["loss"] = max(abs(sum(r[i] for r in gathered) / world - ref_losses[i]) for i in range(len(draws)))
        full = dm.full_state_dict()
        row["state"] = _max_diff(full, ref.state_dict())
        full_optimizer = dm.full_optimizer_state_dict(optimizer)
        row["optimizer"] = _optimizer_diff(full_optimizer, ref_optimizer.state_dict())
        plain = _setup(seed=1)[0]
        plain.load_state_dict(full)  # strict: the plain model's keys
        with torch.no_grad():
            row["plain_outputs"] = float((plain(local).predictions_BT - ref(local).predictions_BT).abs().max())
        # a one-process state (weights + Adam's moments) into a fresh sharded model: the next step
        fresh = _setup(seed=2)[0]
        dm2 = torchrec_model_parallel(fresh, ctx, sharding=sharding)
        optimizer2 = build_optimizer(fresh, train)
        dm2.load_full_state_dict(ref.state_dict())
        dm2.load_full_optimizer_state_dict(optimizer2, ref_optimizer.state_dict())
        _steps(dm2.module, optimizer2, task, [_batch(features, config, slice(4 * rank, 4 * rank + 4), 3)])
        _steps(ref, ref_optimizer, task, [_batch(features, config, slice(0, 8), 3)])
        row["resumed_state"] = _max_diff(dm2.full_state_dict(), ref.state_dict())
        # gradient clipping that bites (max norm 0.01): the norm counts every rank's table blocks
        model3, ref3 = _setup(seed=3)[0], _setup(seed=3)[0]
        dm3 = torchrec_model_parallel(model3, ctx, sharding=sharding)
        sgd = TrainConfig(lr=0.5, weight_decay=0.0, optimizer="sgd")
        opt3, ref_opt3 = build_optimizer(model3, sgd), build_optimizer(ref3, sgd)
        params3 = [p for p in model3.parameters() if p.requires_grad]
        norms, ref_norms = [], []
        _steps(dm3.module, opt3, task, [_batch(features, config, slice(4 * rank, 4 * rank + 4), d) for d in draws],
               clip=lambda n=norms, m=model3, ps=params3, sh=dm3.sharded_parameters:
               n.append(float(clip_grad_norm_(m, ps, 0.01, sh))))
        _steps(ref3, ref_opt3, task, [_batch(features, config, slice(0, 8), d) for d in draws],
               clip=lambda n=ref_norms, m=ref3: n.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01))))
        row["clip_norm"] = max(abs(a - b) / b for a, b in zip(norms, ref_norms, strict=True))
        row["clip_bites"] = min(ref_norms) > 0.1
        row["clipped_state"] = _max_diff(dm3.full_state_dict(), ref3.state_dict())
        row["local_tables"] = sorted(n.split(".")[-2] for n, p in model.named_parameters()
                                     if "embedding_bags" in n and p.numel())
        results[sharding] = row
    if rank == 0:
        Path(out, "scenarios.json").write_text(json.dumps(results))
    else:
        Path(out, "rank1.json").write_text(json.dumps({s: r["local_tables"] for s, r in results.items()}))


def _entry(rank: int, world: int, port: int, out: str) -> None:
    faulthandler.enable()  # a rank killed by a signal (a SIGABRT was seen once under -n 2) prints its stack
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        _scenarios(rank, world, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("recsys_dmp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_entry, args=(WORLD, port, str(out)), nprocs=WORLD, join=True)
    return json.loads((out / "scenarios.json").read_text()), json.loads((out / "rank1.json").read_text())


@pytest.mark.parametrize("sharding", SHARDING_TYPES)
def test_sharded_model_trains_like_one_process(scenarios, sharding):
    row = scenarios[0][sharding]
    for key in ("forward", "loss", "state", "optimizer", "plain_outputs", "resumed_state"):
        assert row[key] < TOL, (sharding, key, row)


@pytest.mark.parametrize("sharding", SHARDING_TYPES)
def test_clipping_counts_every_ranks_table_blocks(scenarios, sharding):
    row = scenarios[0][sharding]  # two SGD steps clipped to norm 0.01 (the norms are > 0.1)
    assert row["clip_bites"] and row["clip_norm"] < TOL and row["clipped_state"] < TOL, (sharding, row)


def test_sharding_types_place_the_tables_as_named(scenarios):
    rank0, rank1 = scenarios[0], scenarios[1]
    every = sorted(rank0["data_parallel"]["local_tables"])
    assert len(every) == 11 and rank1["data_parallel"] == every  # replicated: all tables everywhere
    tw0, tw1 = set(rank0["table_wise"]["local_tables"]), set(rank1["table_wise"])
    assert tw0 and tw1 and not tw0 & tw1 and sorted(tw0 | tw1) == every  # each table on one rank
    for split in ("row_wise", "column_wise", "table_row_wise"):  # a block of every table on each rank
        assert sorted(rank0[split]["local_tables"]) == every == sorted(rank1[split]), split


def test_table_wise_plan_balances_the_tables():
    model = _setup()[0]
    plan = sharding_plan(model, 2).plan
    ranks = {table: p.ranks for module in plan.values() for table, p in module.items()}
    assert all(len(r) == 1 for r in ranks.values()) and {r[0] for r in ranks.values()} == {0, 1}
    assert ranks["t_year"] == [0]  # the biggest table (18 x 4) goes first, onto rank 0
    assert {p.compute_kernel for module in plan.values() for p in module.values()} == {"dense"}
    with pytest.raises(ValueError, match="sharding must be one of"):
        sharding_plan(model, 2, "grid")


def test_train_nproc_2_shards_the_tables_and_evaluates_in_one_process(data_root, tmp_path):
    out = tmp_path / "dmp-run"
    done = subprocess.run(
        [sys.executable, "-m", "moe_apps.cli", "recsys", "train", "--preset", "tiny", "--nproc", "2",
         "--data-dir", str(data_root), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torchrec DistributedModelParallel (table_wise, dense kernel) over 2 processes" in done.stdout
    # the run folder: one-process checkpoints holding every table and its Adam moments
    config, _ = read_run_config(out)
    plain = build_model(config.model)
    last = read_checkpoint(out / "checkpoints" / "last.pt")
    assert {k: tuple(v.shape) for k, v in last["model"].items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()}
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    on_rank1 = [t for module in sharding_plan(plain, 2).plan.values() for t, p in module.items() if p.ranks == [1]]
    assert on_rank1
    for table in on_rank1:
        key = next(n for n in names if n.endswith(f".{table}.weight"))
        moments = last["optimizer"]["state"][names.index(key)]["exp_avg"]
        assert moments.shape == last["model"][key].shape and float(moments.abs().sum()) > 0, table
    assert len((out / "metrics.jsonl").read_text().splitlines()) == config.epochs
    # eval in this process reads it and agrees with the test metrics rank 0 wrote
    evaluated = CliRunner().invoke(app, ["recsys", "eval", str(out), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output)["metrics"]
    saved = json.loads((out / "test_metrics.json").read_text())["metrics"]
    assert metrics.keys() == saved.keys() and "ndcg@10" in metrics
    for key, value in saved.items():
        assert (math.isnan(value) and math.isnan(metrics[key])) or abs(metrics[key] - value) < 1e-6, key
    # and one process continues the 2-process run from its last checkpoint
    resumed = CliRunner().invoke(app, ["recsys", "train", "--out", str(out), "--resume", "--epochs",
                                       str(config.epochs + 1), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {out} at epoch {config.epochs + 1}" in " ".join(resumed.output.split())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == config.epochs + 1


def test_early_stopping_on_the_validation_ranking_under_torchrun(data_root, tmp_path):
    """With monitor="ndcg@10" every rank ranks the validation part with the sharded model: the
    logged val ndcg@10 of the best epoch equals one process's ranking of the best checkpoint."""
    from ranking_monitor_worker import CONFIG

    from moe_apps.recsys.ranking import evaluate_ranking
    from moe_apps.recsys.train import load_run, rate_odds_ratio

    out = tmp_path / "ranked"
    worker = Path(__file__).with_name("ranking_monitor_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(worker), str(data_root), str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=800)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ndcg = [row["val_ndcg@10"] for row in rows]
    assert len(ndcg) == CONFIG.epochs and all(0 < v <= 1 for v in ndcg)
    best = json.loads((out / "test_metrics.json").read_text())["best_epoch"]
    assert best == 1 + ndcg.index(max(ndcg))
    loaded = load_run(out, data_dir=data_root)
    run = loaded.run
    by_hand = evaluate_ranking(loaded.model, run.features, CONFIG.model.tasks, run.fit, run.val,
                               len(run.data.users), len(run.data.items), ks=(10,),
                               odds_ratio_U=rate_odds_ratio(loaded.config, run))
    assert ndcg[best - 1] == pytest.approx(by_hand["ndcg@10"], rel=1e-6)
