"""Checkpoint averaging for translation (`eval --average N`, `translate --average N`): the weights
scored are the element-wise mean of the last N kept epoch snapshots, computed here independently
from the snapshot files; the JSON and the file names say which weights were scored; a run that kept
fewer snapshots, or none, is refused with one line and nothing written."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from typer.testing import CliRunner

from moe_apps.cli import app

runner = CliRunner()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _copy(smoke_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    return run


def _mean_of_files(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The reference: plain torch.load of each snapshot, float64 mean of every float tensor."""
    states = [torch.load(p, map_location="cpu", weights_only=True)["model"] for p in paths]
    mean = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            mean[key] = torch.stack([s[key].double() for s in states]).mean(0)
        else:
            mean[key] = last
    return mean


def test_smoke_preset_keeps_snapshots(smoke_run: Path) -> None:
    names = sorted(p.name for p in (smoke_run / "checkpoints").glob("epoch-*.pt"))
    assert names == ["epoch-0001.pt", "epoch-0002.pt"]


def test_average_loads_the_mean_of_the_last_snapshots(smoke_run: Path) -> None:
    from moe_apps.translation.inference import load_run

    snapshots = sorted((smoke_run / "checkpoints").glob("epoch-*.pt"))
    expected = _mean_of_files(snapshots)
    loaded = load_run(smoke_run, average=2)
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 or not value.is_floating_point()
        torch.testing.assert_close(got[key].double(), value.double(), rtol=0, atol=1e-7)
    last = torch.load(snapshots[-1], weights_only=True)["model"]
    assert any(not torch.equal(got[k], last[k]) for k in last)  # the mean is not just the last one
    assert [p.name for p in loaded.checkpoints] == ["epoch-0001.pt", "epoch-0002.pt"]
    one = load_run(smoke_run, average=1).model.state_dict()
    assert all(torch.equal(one[k], last[k]) for k in last)
    assert [p.name for p in load_run(smoke_run).checkpoints] == ["best.pt"]


def test_eval_average_json_says_which_weights(smoke_run: Path, tmp_path: Path, multi30k_root: Path) -> None:
    from moe_apps.translation.data import read_text_lines
    from moe_apps.translation.inference import load_run, translate_lines
    from moe_apps.translation.model import build_model

    run = _copy(smoke_run, tmp_path)
    args = ["translation", "eval", str(run), "--split", "val", "--beam", "1", "--json",
            "--data-dir", str(multi30k_root)]
    averaged = runner.invoke(app, [*args, "--average", "2"])
    assert averaged.exit_code == 0, averaged.output
    scores = json.loads(averaged.stdout.strip().splitlines()[-1])
    assert scores["weights"] == "average" and scores["average"] == 2
    assert scores["checkpoints"] == ["epoch-0001.pt", "epoch-0002.pt"]
    for key in ("bleu", "chrf", "bleu_signature", "chrf_signature", "bleu_lowercase", "length_ratio"):
        assert key in scores
    assert (run / "hypotheses" / "val.beam1.avg2.txt").is_file()
    assert json.loads((run / "eval" / "val.beam1.avg2.json").read_text())["checkpoints"] == scores["checkpoints"]
    best = runner.invoke(app, args)
    assert best.exit_code == 0, best.output
    best_scores = json.loads(best.stdout.strip().splitlines()[-1])
    assert best_scores["weights"] == "best" and best_scores["checkpoints"] == ["best.pt"]
    assert best_scores["average"] is None and (run / "hypotheses" / "val.beam1.txt").is_file()
    # the hypotheses are the averaged model's: decode the val sources with the reference mean
    reference = load_run(run)
    model = build_model(reference.config.model)
    snapshots = sorted((run / "checkpoints").glob("epoch-*.pt"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in _mean_of_files(snapshots).items()})
    sources = read_text_lines(multi30k_root / "multi30k" / "val.de.gz")
    lines = translate_lines(replace(reference, model=model.eval()), sources, beam=1).lines
    assert (run / "hypotheses" / "val.beam1.avg2.txt").read_text().splitlines() == lines


def test_average_refuses_more_snapshots_than_kept(smoke_run: Path, tmp_path: Path) -> None:
    run = _copy(smoke_run, tmp_path)
    before = _files(run)
    for command in (["eval", str(run), "--average", "3"], ["translate", str(run), "Ein hund.", "--average", "3"]):
        result = runner.invoke(app, ["translation", *command])
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and "keeps 2 epoch snapshots" in result.output
    assert _files(run) == before
    for snapshot in (run / "checkpoints").glob("epoch-*.pt"):
        snapshot.unlink()
    before = _files(run)
    result = runner.invoke(app, ["translation", "eval", str(run), "--average", "2"])
    assert result.exit_code == 1 and "no epoch snapshots" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and _files(run) == before
    assert runner.invoke(app, ["translation", "eval", str(run), "--average", "0"]).exit_code == 2


def test_translate_with_average(smoke_run: Path) -> None:
    from moe_apps.translation.inference import load_run, translate_lines

    result = runner.invoke(app, ["translation", "translate", str(smoke_run), "--average", "2"],
                           input="Ein mann fährt fahrrad.\nZwei hund.\n")
    assert result.exit_code == 0, result.output
    expected = translate_lines(load_run(smoke_run, average=2), ["Ein mann fährt fahrrad.", "Zwei hund."])
    assert result.stdout.splitlines() == expected.lines
