"""benchmarks/vision_quality.py runs end to end on the smoke preset and a synthetic CIFAR-10:
both models train in child processes with the recipe and model-config changes passed to them, the
step-time ratio is measured, the table merges saved runs and pairs seeds against dense; a bad
change is refused before anything trains. benchmarks/vision_precision.py times each model in every
precision and layout; benchmarks/vision_condconv.py times each form of CondConv's mixed convolution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "vision_quality.py"


def test_vision_quality_benchmark_smoke(cifar_data: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--models", "moe", "dense", "--seeds", "0",
         "--data-dir", str(cifar_data), "--out", str(tmp_path / "runs"), "--step-time", "--rounds", "2",
         "--batch-size", "16", "--recipe", "router_lr_scale=0.05", "--recipe", "label_smoothing=0.1",
         "--model-config", "num_experts=4", "top_k=2", "expert_width=8", "--json"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert [r["model"] for r in result["runs"]] == ["moe", "dense"]
    assert result["recipe"] == {"router_lr_scale": 0.05, "label_smoothing": 0.1}
    assert result["model_config"] == {"num_experts": 4, "top_k": 2, "expert_width": 8}
    for model in ("moe", "dense"):
        saved = json.loads((tmp_path / "runs" / f"{model}-s0" / "config.json").read_text())["config"]
        assert saved["recipe"]["router_lr_scale"] == 0.05 and saved["recipe"]["label_smoothing"] == 0.1
        assert (saved["model"]["num_experts"], saved["model"]["top_k"], saved["model"]["expert_width"]) == (4, 2, 8)
    for run in result["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["train_seconds"] > 0 and run["peak_train_mib"] > 100
    moe, dense = result["summary"]["moe"], result["summary"]["dense"]
    assert abs(moe["flops"] - dense["flops"]) <= 0.01 * moe["flops"]
    assert moe["parameters"] > dense["parameters"]
    timing = result["step_time"]
    assert timing["ratio"] == timing["moe_s"] / timing["dense_s"] > 0
    saved = tmp_path / "result.json"
    saved.write_text(done.stdout)
    table = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved), str(saved)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| moe | 2 (0, 0) | 2 |" in table.stdout and "ratio" in table.stdout
    assert f"| {100 * moe['accuracy_mean']:.2f} +- 0.00% | {100 * moe['accuracy'][0]:.2f} / " in table.stdout
    assert "recipe changes: router_lr_scale=0.05, label_smoothing=0.1" in table.stdout
    assert "model-config changes: num_experts=4, top_k=2, expert_width=8" in table.stdout
    gap = result["paired"]["moe"]
    assert gap["seeds"] == [0] and gap["differences"] == [moe["accuracy"][0] - dense["accuracy"][0]]
    assert f"moe - dense, paired by seed (0): {100 * gap['mean']:+.2f} points" in table.stdout


def test_paired_gaps_match_the_recorded_hand_arithmetic(monkeypatch, capsys) -> None:
    """The three-seed test runs of docs/BENCHMARKS.md (router at 0.1 x the lr): moe - dense was
    worked out by hand there as +0.07 / -0.24 / +0.06, -0.04 +- 0.18. Seeds only one model ran are
    left out (so are seeds run for other epochs); a model without any shared seed gets no line."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import vision_quality

    accuracy = {"moe": [0.9441, 0.9410, 0.9435, 0.9394], "dense": [0.9434, 0.9434, 0.9429], "condconv": [],
                "dense-wide": [0.9425]}
    runs = [{"model": m, "seed": s, "epochs": 12, "accuracy": a}
            for m, values in accuracy.items() for s, a in enumerate(values)]
    runs.append({"model": "condconv", "seed": 7, "epochs": 12, "accuracy": 0.9})
    runs.append({"model": "condconv", "seed": 0, "accuracy": 0.9, "epochs": 3})  # dense's seed 0 had other epochs
    gaps = vision_quality.paired_gaps(runs)
    assert set(gaps) == {"moe", "dense-wide"}
    moe = gaps["moe"]
    assert moe["seeds"] == [0, 1, 2]
    assert [round(100 * d, 2) for d in moe["differences"]] == [0.07, -0.24, 0.06]
    assert (round(100 * moe["mean"], 2), round(100 * moe["std"], 2), round(100 * moe["stderr"], 2)) == (-0.04, 0.18, 0.10)
    assert gaps["dense-wide"]["seeds"] == [0] and gaps["dense-wide"]["std"] == 0.0
    vision_quality.print_gaps(gaps)
    assert ("moe - dense, paired by seed (0, 1, 2): +0.07 / -0.24 / +0.06 points, mean -0.04 +- 0.18 "
            "(standard error 0.10)") in capsys.readouterr().out


def test_score_val_scores_the_held_out_slice_not_the_test_set(cifar_data: Path, tmp_path: Path) -> None:
    """--score val: accuracy on the preset's validation images (recomputed here from the saved
    weights with a plain forward), with and without TTA; the test set is not scored (no eval.json, no confusion matrix)."""
    import torch

    from moe_apps.vision.data import make_splits
    from moe_apps.vision.train import load_run

    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--models", "moe", "--seeds", "1", "--score", "val",
         "--data-dir", str(cifar_data), "--out", str(tmp_path / "runs"), "--json"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(done.stdout)["runs"]
    assert run["score"] == "val" and 0.0 <= run["accuracy"] <= 1.0
    loaded = load_run(tmp_path / "runs" / "moe-s1")
    val = make_splits(loaded.config, cifar_data).val
    assert len(val) == 100  # the smoke preset's held-out images (its test slice has 500)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        predicted = loaded.model.eval()(val.images).logits_BC
    assert round(run["accuracy_one_view"] * len(val)) == int((predicted.argmax(-1) == val.labels).sum())
    run_dir = tmp_path / "runs" / "moe-s1"
    assert not (run_dir / "eval.json").exists() and not (run_dir / "confusion.png").exists()
    saved = tmp_path / "val.json"
    saved.write_text(done.stdout)
    table = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved)], capture_output=True,
                           text=True, timeout=60)
    assert "val. acc. (TTA)" in table.stdout and f"({100 * run['accuracy_one_view']:.2f})" in table.stdout
    as_test = json.loads(done.stdout)
    del as_test["runs"][0]["score"]  # a result saved before --score: scored on the test set
    (tmp_path / "test.json").write_text(json.dumps(as_test))
    mixed = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved), str(tmp_path / "test.json")],
                           capture_output=True, text=True, timeout=60)
    assert mixed.returncode != 0 and "cannot share a table" in mixed.stderr
    refused = subprocess.run([sys.executable, str(SCRIPT), "--score", "val", "--out", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "holds out no validation images" in refused.stderr
    assert not (tmp_path / "no").exists()


def test_vision_quality_benchmark_refuses_a_bad_change(tmp_path: Path) -> None:
    for flag, change, words in (
            ("--recipe", "router_lr=0.1", "RecipeConfig field"), ("--recipe", "lr", "NAME=VALUE"),
            ("--recipe", "lr=fast", "lr must be a finite number"), ("--recipe", "router_lr_scale=-1", "router_lr_scale must be"),
            ("--recipe", "epochs=3", "with --epochs"), ("--model-config", "model=dense", "with --models"),
            ("--model-config", "experts=4", "ModelConfig field"), ("--model-config", "expert_width=0", "expert_width"),
            ("--model-config", "widths=7", "--model-config: "), ("--model-config", "router=top1", "must be one of topk, gumbel"),
            ("--recipe", "channels_last=False", "channels_last must be true or false")):
        done = subprocess.run([sys.executable, str(SCRIPT), flag, change, "--out", str(tmp_path / "runs"),
                               "--data-dir", str(tmp_path / "no-data"), "--preset", "smoke"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and words in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "runs").exists()


def test_changes_read_json_values_and_bare_text(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import vision_quality

    from moe_apps.vision.config import ModelConfig, RecipeConfig

    changes = vision_quality.config_changes(["router=gumbel", "expert_stages=[1, 2]", "num_experts=3"],
                                            ModelConfig, "--model-config", {})
    assert changes == {"router": "gumbel", "expert_stages": (1, 2), "num_experts": 3}
    assert vision_quality.config_changes(['precision="fp32"', "channels_last=false"], RecipeConfig,
                                         "--recipe", {}) == {"precision": "fp32", "channels_last": False}


def test_step_time_follows_the_recipe_precision_and_layout(cifar_data: Path, monkeypatch) -> None:
    """--step-time in fp32 without channels_last (as --recipe says): every forward of the timed
    nets runs without autocast on NCHW input, and the table says which precision it timed."""
    import torch

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import vision_steps

    from moe_apps.vision.model import VisionNet

    seen = []
    forward = VisionNet.forward

    def spy(self, x, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), self.channels_last))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(VisionNet, "forward", spy)
    timing = vision_steps.step_times(1, 8, str(cifar_data), {"precision": "fp32", "channels_last": False})
    assert seen and set(seen) == {(False, False)}
    assert (timing["precision"], timing["channels_last"]) == ("fp32", False)
    seen.clear()
    vision_steps.step_times(1, 8, str(cifar_data))  # the recipe's defaults: bf16, channels_last
    assert set(seen) == {(True, True)}


def test_precision_benchmark_times_every_variant_in_its_own_precision_and_layout(cifar_data: Path,
                                                                                  monkeypatch, capsys) -> None:
    """benchmarks/vision_precision.py: four variants per model, each timed step running the net its
    name says (model, autocast on or off, layout), times relative to the same model's bf16 +
    channels_last row."""
    import torch

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import vision_precision

    from moe_apps.vision.model import VisionNet

    seen, current = set(), []
    forward, make_steps = VisionNet.forward, vision_precision.training_steps

    def spy(self, x, *args, **kwargs):
        seen.add((current[-1], self.config.model, torch.is_autocast_enabled("cpu"), self.channels_last))
        return forward(self, x, *args, **kwargs)

    def named_steps(*args, **kwargs):
        step = make_steps(*args, **kwargs)
        return lambda name: current.append(name) or step(name)

    monkeypatch.setattr(VisionNet, "forward", spy)
    monkeypatch.setattr(vision_precision, "training_steps", named_steps)
    vision_precision.main(["--rounds", "1", "--batch-size", "8", "--data-dir", str(cifar_data), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert seen == {(f"{m} {p} {layout}", m, p == "bf16", layout == "channels_last")
                    for m in ("moe", "dense") for p in ("bf16", "fp32") for layout in ("channels_last", "NCHW")}
    rows = {(r["model"], r["precision"], r["layout"]): r for r in result["rows"]}
    assert len(rows) == 8 and all(r["step_s"] > 0 for r in rows.values())
    for model in ("moe", "dense"):
        assert rows[(model, "bf16", "channels_last")]["vs_default"] == 1.0
        fp32 = rows[(model, "fp32", "NCHW")]
        assert fp32["vs_default"] == fp32["step_s"] / rows[(model, "bf16", "channels_last")]["step_s"]
    assert {"cpu_capability", "amx", "avx512_bf16", "threads"} <= set(result["cpu"])
    vision_precision.main(["--models", "dense", "--precisions", "fp32", "--rounds", "1", "--batch-size", "8",
                           "--data-dir", str(cifar_data)])
    table = capsys.readouterr().out
    assert "| dense | fp32 | NCHW |" in table and "| dense | fp32 | channels_last |" in table
    assert "| - |" in table  # no bf16 + channels_last row to compare with


def test_condconv_benchmark_times_each_form_it_names(cifar_data: Path, monkeypatch, capsys) -> None:
    """Each timed layer step runs the form its column names (2 warm-up steps + 1 round, per E), the
    network steps run condconv's two CondConv2d in the form picked for E = 2, and the table says
    which form each E gets."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import vision_condconv

    from moe_apps.vision import condconv

    ran = []
    for kind, form in list(condconv.MIXED_CONVS.items()):
        monkeypatch.setitem(condconv.MIXED_CONVS, kind,
                            lambda *args, _kind=kind, _form=form: ran.append(_kind) or _form(*args))
    vision_condconv.main(["--experts", "1", "8", "--batch-size", "2", "--rounds", "1", "--step",
                          "--data-dir", str(cifar_data)])
    table = capsys.readouterr().out
    assert ran.count("grouped") == 2 * 3 and ran.count("summed") == 2 * 3 + 2 * 3
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert rows[0].endswith("| summed |") and rows[1].endswith("| grouped |")
    assert "| condconv |" in table and "| dense |" in table and "| 1.00 |" in table
