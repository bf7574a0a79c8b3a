"""`moe-apps vision train / eval / predict` on the smoke preset and a synthetic CIFAR-10
(CliRunner), refusals before any work, a corrupted checkpoint, a --resume that would change the
run, and kill -9 + --resume giving the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from run_faults import assert_kill_then_resume_is_exact
from typer.testing import CliRunner

from moe_apps.cli import app
from moe_apps.vision.config import ModelConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(cifar_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vision-runs") / "moe-smoke"
    result = runner.invoke(app, ["vision", "train", "--preset", "smoke", "--data-dir", str(cifar_data),
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    return out


def test_train_writes_a_run(trained: Path) -> None:
    config = json.loads((trained / "config.json").read_text())
    assert config["app"] == "vision" and config["config"]["model"]["model"] == "moe"
    assert (trained / "checkpoints" / "best.pt").is_file() and (trained / "curves.png").is_file()
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["val_accuracy"] > 0.3  # the synthetic classes are easy


def test_eval_json_and_plots(trained: Path, cifar_data: Path) -> None:
    result = runner.invoke(app, ["vision", "eval", str(trained), "--json", "--data-dir", str(cifar_data)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert 0.0 <= report["accuracy"] <= 1.0 and report["tta"] is True and report["images"] == 240
    assert len(report["per_class_accuracy"]) == 10
    assert sum(map(sum, report["confusion_matrix"])) == 240
    fractions = report["expert_fraction_by_class"]["stage2"]
    assert len(fractions) == 10 and all(len(row) == ModelConfig().num_experts for row in fractions)
    for name in ("confusion.png", "experts_by_class.png", "confident_errors.png"):
        assert (trained / name).read_bytes()[:4] == b"\x89PNG"
    plain = runner.invoke(app, ["vision", "eval", str(trained), "--no-tta", "--data-dir", str(cifar_data)])
    assert plain.exit_code == 0 and "no TTA" in plain.output


def test_narrow_experts_from_the_cli_train_and_eval(cifar_data: Path, tmp_path: Path) -> None:
    """--num-experts 4 --top-k 2 --expert-width 8 (in fp32): the run keeps the four choices and
    eval's heatmap counts each image's first expert among the four."""
    out = tmp_path / "narrow"
    trained = runner.invoke(app, ["vision", "train", "--preset", "smoke", "--num-experts", "4", "--top-k", "2",
                                  "--expert-width", "8", "--precision", "fp32", "--epochs", "1", "--router", "topk",
                                  "--data-dir", str(cifar_data), "--out", str(out), "--no-progress"])
    assert trained.exit_code == 0, trained.output
    config = json.loads((out / "config.json").read_text())["config"]
    saved = config["model"]
    assert (saved["num_experts"], saved["top_k"], saved["expert_width"]) == (4, 2, 8)
    assert config["recipe"]["precision"] == "fp32"
    result = runner.invoke(app, ["vision", "eval", str(out), "--json", "--no-tta", "--data-dir", str(cifar_data)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["expert_fraction_by_class"]["stage2"]
    assert len(rows) == 10 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-6 for row in rows)


def test_condconv_eval_plots_which_kernels_each_class_uses(cifar_data: Path, tmp_path: Path) -> None:
    """condconv mixes every kernel; its heatmap counts the kernel with the largest mixing weight
    of each image, per conv of its expert stage (as moe counts its top-1 expert)."""
    out = tmp_path / "condconv"
    trained = runner.invoke(app, ["vision", "train", "--preset", "smoke", "--model", "condconv", "--num-experts", "4",
                                  "--epochs", "1", "--data-dir", str(cifar_data), "--out", str(out), "--no-progress"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["vision", "eval", str(out), "--json", "--no-tta", "--data-dir", str(cifar_data)])
    assert result.exit_code == 0, result.output
    fractions = json.loads(result.output)["expert_fraction_by_class"]
    assert set(fractions) == {"stage2.conv1", "stage2.conv2"}
    for rows in fractions.values():
        assert len(rows) == 10 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-6 for row in rows)
    assert (out / "experts_by_class.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_good_and_bad_files(trained: Path, tmp_path: Path) -> None:
    Image.new("L", (45, 80), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (64, 64), (10, 200, 10, 128)).save(tmp_path / "alpha.png")
    Image.new("RGB", (500, 300), (200, 10, 10)).save(tmp_path / "big.jpg")
    (tmp_path / "notes.png").write_text("hello")
    ok = runner.invoke(app, ["vision", "predict", str(trained), str(tmp_path / "grey.png"),
                             str(tmp_path / "big.jpg"), "--top", "3", "--json"])
    assert ok.exit_code == 0, ok.output
    predictions = json.loads(ok.output)["predictions"]
    assert [len(p["top"]) for p in predictions] == [3, 3]
    assert all(abs(sum(r["probability"] for r in p["top"])) <= 1.0 + 1e-6 for p in predictions)
    mixed = runner.invoke(app, ["vision", "predict", str(trained), str(tmp_path / "notes.png"),
                                str(tmp_path / "alpha.png"), str(tmp_path / "gone.jpg")])
    assert mixed.exit_code == 1
    assert "alpha.png" in mixed.stdout  # the good one is still predicted
    errors = [line for line in mixed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "notes.png" in errors[0] and "gone.jpg" in errors[1]
    assert "Traceback" not in mixed.output


def test_predict_goes_on_past_an_image_too_large_to_decode(trained: Path, tmp_path: Path) -> None:
    """Pillow's decompression-bomb refusal is one error line like any bad file, not a traceback
    that stops the files after it."""
    from test_vision_data import png_bytes

    (tmp_path / "huge.png").write_bytes(png_bytes(20000, 20000, 8, 0, []))
    Image.new("RGB", (40, 40), (0, 0, 200)).save(tmp_path / "blue.png")
    result = runner.invoke(app, ["vision", "predict", str(trained), str(tmp_path / "huge.png"),
                                 str(tmp_path / "blue.png"), "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [p["file"] for p in json.loads(result.stdout)["predictions"]] == [str(tmp_path / "blue.png")]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "huge.png" in errors[0] and "too large" in errors[0]


@pytest.mark.parametrize("args,code,message", [
    (["--num-experts", "4", "--top-k", "5"], 1, "top_k"),
    (["--model", "condconv", "--num-experts", "4", "--top-k", "5"], 1, "top_k"),
    (["--model", "condconv", "--top-k", "0"], 1, "top_k"),
    (["--num-experts", "0"], 1, "num_experts"),
    (["--expert-width", "0"], 1, "expert_width"),
    (["--model", "condconv", "--expert-width", "64"], 1, "not condconv"),
    (["--epochs", "0"], 2, "epochs"),
    (["--model", "resnet"], 1, "model must be"),
    (["--preset", "huge"], 1, "unknown preset"),
    (["--precision", "fp16"], 1, "precision (--precision) must be"),
    (["--router", "switch"], 1, "router (--router) must be one of topk, gumbel"),
    (["--router", "gumbel", "--top-k", "2"], 1, "it needs top_k (--top-k) = 1"),
])
def test_impossible_configs_are_refused_before_any_work(tmp_path: Path, args: list[str], code: int,
                                                        message: str) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["vision", "train", "--preset", "smoke", "--out", str(out),
                                 "--data-dir", str(tmp_path / "no-data"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_not_a_run_and_corrupted_checkpoint(trained: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["vision", "eval", str(tmp_path)])
    assert result.exit_code == 1 and "not a vision run" in result.output
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    best = copy / "checkpoints" / "best.pt"
    raw = bytearray(best.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    best.write_bytes(bytes(raw))
    result = runner.invoke(app, ["vision", "predict", str(copy), str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "best.pt" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("damage", [
    lambda c: c["model"].update(kernel=5),  # a key this version does not know
    lambda c: c.update(recipe="fast"),  # not an object
    lambda c: c["model"].update(top_k=9),  # an impossible config
])
def test_a_damaged_config_json_is_refused_in_one_line(trained: Path, tmp_path: Path, cifar_data: Path,
                                                      damage) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    saved = json.loads((copy / "config.json").read_text())
    damage(saved["config"])
    (copy / "config.json").write_text(json.dumps(saved))
    for args in (["eval", str(copy), "--data-dir", str(cifar_data)],
                 ["predict", str(copy), str(tmp_path / "x.png")],
                 ["train", "--preset", "smoke", "--out", str(copy), "--resume", "--data-dir", str(cifar_data)]):
        result = runner.invoke(app, ["vision", *args])
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output and "config.json" in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("change,flag", [(["--precision", "fp32"], "--precision"),
                                         (["--num-experts", "4"], "--num-experts")])
def test_resume_refuses_a_changed_recipe_or_model(trained: Path, tmp_path: Path, cifar_data: Path,
                                                   change: list[str], flag: str) -> None:
    """--resume continues the saved run: a different precision or model is one line naming the
    flag, exit 1, and the run folder is left as it was."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["vision", "train", "--out", str(copy), "--resume", "--data-dir", str(cifar_data),
                                 "--no-progress", *change])
    assert result.exit_code == 1, result.output
    assert f"{flag} differs from the run's config.json" in result.output and "Traceback" not in result.output
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_a_run_of_another_app_is_refused_in_one_line(trained: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "recsys-run"
    shutil.copytree(trained, copy)
    saved = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**saved, "app": "recsys"}))
    for args in (["eval", str(copy)], ["predict", str(copy), str(tmp_path / "x.png")]):
        result = runner.invoke(app, ["vision", *args])
        assert result.exit_code == 1 and "recsys run" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def _train_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_apps.cli", "vision", "train", "--preset", "smoke", "--out", str(out),
            "--data-dir", str(data), "--no-progress", *extra]


def test_kill_then_resume_gives_identical_weights(cifar_data: Path, tmp_path: Path) -> None:
    assert_kill_then_resume_is_exact(lambda out, *extra: _train_cmd(out, cifar_data, *extra), tmp_path)
