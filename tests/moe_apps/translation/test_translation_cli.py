"""`moe-apps translation train / eval / translate` through Typer's CliRunner on a synthetic
Multi30k: the run folder's files, the eval JSON keys, user test files (plain and gzipped), stdin
translation (one output line per input line, UTF-8 only), --show-routing (the experts the
translation used, token choice and expert choice), bad input (one line, exit 1, nothing written),
and kill -9 then --resume giving bit-identical weights and snapshots."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import torch
from run_faults import assert_kill_then_resume_is_exact
from typer.testing import CliRunner

from moe_apps.cli import app

runner = CliRunner()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_train_writes_the_run_folder(smoke_run: Path) -> None:
    files = _files(smoke_run)
    for name in ("config.json", "spm.model", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt",
                 "curves.png", "routing.json", "routing.png", "train_summary.json"):
        assert name in files, name
    routing = json.loads((smoke_run / "routing.json").read_text())
    assert set(routing) == {"encoder.0", "decoder.0"}
    for layer in routing.values():
        assert abs(sum(layer["fraction_per_expert"]) - 1) < 1e-6 and layer["val_dropped_fraction"] == 0
    assert json.loads((smoke_run / "config.json").read_text())["app"] == "translation"


def test_eval_json_on_a_split_writes_hypotheses(smoke_run: Path, tmp_path: Path, multi30k_root: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    result = runner.invoke(app, ["translation", "eval", str(run), "--split", "val", "--beam", "2", "--json",
                                 "--data-dir", str(multi30k_root)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("bleu", "chrf", "bleu_signature", "chrf_signature", "bleu_lowercase", "length_ratio"):
        assert key in scores
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed") and scores["sentences"] == 24
    hypotheses = (run / "hypotheses" / "val.beam2.txt").read_text().splitlines()
    assert len(hypotheses) == 24


def test_eval_scores_user_files_plain_and_gzipped(smoke_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    src, ref = tmp_path / "mine.de", tmp_path / "mine.en.gz"
    src.write_text("Ein mann fährt fahrrad.\nZwei hund.\n")
    ref.write_bytes(gzip.compress(b"A man rides bike.\nTwo dog.\n"))
    result = runner.invoke(app, ["translation", "eval", str(run), "--src", str(src), "--ref", str(ref),
                                 "--beam", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["sentences"] == 2
    assert (run / "hypotheses" / "mine.de.beam1.txt").is_file()


def test_eval_refuses_mismatched_files_and_writes_nothing(smoke_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = _files(run)
    src, ref = tmp_path / "a.de", tmp_path / "b.en"
    src.write_text("Ein hund.\nZwei hund.\n")
    ref.write_text("A dog.\n")
    result = runner.invoke(app, ["translation", "eval", str(run), "--src", str(src), "--ref", str(ref)])
    assert result.exit_code == 1
    assert "has 2 lines but" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _files(run) == before


def test_another_apps_run_folder_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "recsys-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"app": "recsys", "config": {}, "format": 1}))
    for command in (["eval", str(other)], ["translate", str(other), "Ein Hund."],
                    ["eval", str(other), "--average", "2"],
                    ["train", "--preset", "smoke", "--resume", "--out", str(other)]):
        result = runner.invoke(app, ["translation", *command])
        assert result.exit_code == 1 and "recsys" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert _files(other) == {"config.json"}


def test_translate_argument_stdin_empty_lines_and_unseen_characters(smoke_run: Path) -> None:
    result = runner.invoke(app, ["translation", "translate", str(smoke_run), "Ein mann fährt fahrrad."])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 and result.stdout.strip()
    result = runner.invoke(app, ["translation", "translate", str(smoke_run)],
                           input="Ein hund.\n\nZwei 猫 über ŉ straße.\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")[:3]
    assert lines[0].strip() and lines[1] == "" and lines[2].strip()
    empty = runner.invoke(app, ["translation", "translate", str(smoke_run)], input="")
    assert empty.exit_code == 0 and empty.stdout == ""


def test_translate_keeps_one_output_line_per_input_line(smoke_run: Path) -> None:
    # form feed, vertical tab, U+2028 and U+0085 are not line ends of a text file: no extra lines
    text = "Ein hund\x0cläuft.\nZwei\u2028hund.\r\nEin\x0bball\x85rot.\n"
    result = runner.invoke(app, ["translation", "translate", str(smoke_run)], input=text.encode())
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split("\n")) == 4 and result.stdout.endswith("\n")


def test_translate_answers_each_typed_line_before_reading_the_next(smoke_run: Path, monkeypatch) -> None:
    """stdin is a terminal: a person types a line and waits for its translation (no batching until
    end of input)."""
    import io

    import typer

    import moe_apps.translation.inference as inference

    events: list[str] = []

    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

        def readline(self, *args) -> bytes:
            line = super().readline(*args)
            events.append("read")
            return line

    terminal = Terminal(b"Ein hund.\n\nZwei hund.\n")
    monkeypatch.setattr(typer, "get_binary_stream", lambda name: terminal if name == "stdin" else None)
    translate = inference.translate_lines
    monkeypatch.setattr(inference, "translate_lines",
                        lambda *args, **kwargs: events.append("translate") or translate(*args, **kwargs))
    result = runner.invoke(app, ["translation", "translate", str(smoke_run)])
    assert result.exit_code == 0, result.output
    assert events == ["read", "translate"] * 3 + ["read"]
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[0] and lines[1] == "" and lines[2]


def test_translate_refuses_text_that_is_not_utf8(smoke_run: Path) -> None:
    result = runner.invoke(app, ["translation", "translate", str(smoke_run)], input=b"Ein hund.\nEin \xff hund.\n")
    assert result.exit_code == 1, result.output
    assert "line 2" in result.output and "UTF-8" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # an argument the shell could not decode arrives with a lone surrogate (Python's surrogateescape)
    result = runner.invoke(app, ["translation", "translate", str(smoke_run), "Ein \udcff hund."])
    assert result.exit_code == 1 and "UTF-8" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_translate_truncates_an_overlong_line_with_a_warning(smoke_run: Path) -> None:
    long_line = " ".join(["hund"] * 200)
    result = runner.invoke(app, ["translation", "translate", str(smoke_run), long_line])
    assert result.exit_code == 0, result.output
    assert "truncated" in result.output


def test_show_routing_lists_experts_per_subword_and_layer(smoke_run: Path) -> None:
    result = runner.invoke(app, ["translation", "translate", str(smoke_run), "Ein hund.", "--show-routing"])
    assert result.exit_code == 0, result.output
    assert "encoder experts" in result.output and "decoder experts" in result.output
    assert "layer 0" in result.output and "</s>" in result.output


def _used_and_shown(run: Path, sentences: list[str]) -> list[tuple[dict, dict]]:
    """Per sentence: every MoE layer's experts recorded while greedy decoding ran (the encoder once,
    the decoder one cached step per token), and what --show-routing computes for it."""
    from moe_apps.translation.inference import load_run, routing_of, translate_lines

    loaded = load_run(run)
    used: dict[str, list[list[int]]] = {}

    def record(name: str, x_BND, output) -> None:
        routing = output.routing
        if routing.expert_indices_TK is not None:
            used.setdefault(name, []).extend(routing.expert_indices_TK.tolist())
        else:  # expert choice: the experts whose chosen tokens include t, expert by expert
            chosen = routing.token_indices_EC.tolist()
            tokens = range(x_BND.shape[0] * x_BND.shape[1])  # one sentence: no padding
            used.setdefault(name, []).extend([e for e, row in enumerate(chosen) if t in row] for t in tokens)

    hooks = [ffn.inner.register_forward_hook(lambda _m, args, out, name=name: record(name, args[0], out))
             for name, ffn in loaded.model.moe_layers()]
    pairs = []
    try:
        for sentence in sentences:
            used.clear()
            result = translate_lines(loaded, [sentence], beam=1)
            recorded = {name: list(rows) for name, rows in used.items()}
            shown = routing_of(loaded, result.source_ids[0], result.ids[0])["layers"]
            assert len(shown["decoder.0"]) == len(result.ids[0]) + 1  # eos included
            pairs.append((recorded, shown))
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def test_show_routing_is_the_routing_the_translation_used(smoke_run: Path, multi30k_root: Path) -> None:
    from moe_apps.translation.data import read_text_lines

    sentences = read_text_lines(multi30k_root / "multi30k" / "train.de.gz")[:40]
    for recorded, shown in _used_and_shown(smoke_run, sentences):
        assert shown == recorded


def test_show_routing_of_an_expert_choice_encoder(multi30k_root: Path, tmp_path: Path) -> None:
    from moe_apps.translation.data import read_text_lines

    out = tmp_path / "ec"
    result = runner.invoke(app, ["translation", "train", "--preset", "smoke", "--router", "expert-choice",
                                 "--epochs", "1", "--out", str(out), "--data-dir", str(multi30k_root),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    sentences = read_text_lines(multi30k_root / "multi30k" / "val.de.gz")[:8]
    pairs = _used_and_shown(out, sentences)
    for recorded, shown in pairs:
        assert shown["decoder.0"] == recorded["decoder.0"]  # the causal decoder is token choice
        assert [sorted(e) for e in shown["encoder.0"]] == recorded["encoder.0"]
    # expert choice: a token may get more or fewer than 2 experts
    assert any(len(e) != 2 for recorded, _ in pairs for e in recorded["encoder.0"])
    shown = runner.invoke(app, ["translation", "translate", str(out), "--show-routing"],
                          input="\n".join(sentences[:2]) + "\n")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.count("encoder experts") == 2 and shown.stdout.count("decoder experts") == 2


def test_train_refuses_an_existing_run_and_bad_options(smoke_run: Path, multi30k_root: Path) -> None:
    before = _files(smoke_run)
    result = runner.invoke(app, ["translation", "train", "--preset", "smoke", "--out", str(smoke_run),
                                 "--data-dir", str(multi30k_root)])
    assert result.exit_code == 1 and "already holds a run" in result.output
    result = runner.invoke(app, ["translation", "train", "--preset", "smoke", "--router", "nope",
                                 "--out", str(smoke_run.parent / "x")])
    assert result.exit_code == 1 and "router must be one of" in result.output
    assert not (smoke_run.parent / "x").exists()
    assert _files(smoke_run) == before


def _train_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_apps.cli", "translation", "train", "--preset", "smoke", "--out",
            str(out), "--data-dir", str(data), "--no-progress", "--epochs", "3", *extra]


def test_kill_then_resume_gives_identical_weights(multi30k_root: Path, tmp_path: Path) -> None:
    def train_cmd(out: Path, *extra: str) -> list[str]:
        return _train_cmd(out, multi30k_root, *extra)

    whole, killed = assert_kill_then_resume_is_exact(train_cmd, tmp_path)
    assert (killed / "spm.model").read_bytes() == (whole / "spm.model").read_bytes()
    # the kept snapshots (what --average reads) are the same too
    names = sorted(p.name for p in (whole / "checkpoints").glob("epoch-*.pt"))
    assert names == ["epoch-0002.pt", "epoch-0003.pt"]
    assert sorted(p.name for p in (killed / "checkpoints").glob("epoch-*.pt")) == names
    for name in names:
        a, b = (torch.load(run / "checkpoints" / name, weights_only=True)["model"] for run in (whole, killed))
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_en_de_direction_reads_english_sources(multi30k_root: Path, tmp_path: Path) -> None:
    from moe_apps.datasets import load_multi30k
    from moe_apps.translation.inference import evaluation_set, load_run

    out = tmp_path / "en-de"
    result = runner.invoke(app, ["translation", "train", "--preset", "smoke", "--direction", "en-de", "--epochs", "1",
                                 "--out", str(out), "--data-dir", str(multi30k_root), "--no-progress"])
    assert result.exit_code == 0, result.output
    name, sources, references = evaluation_set(load_run(out), split="val", src=None, ref=None)
    val = load_multi30k(multi30k_root, ["val"])["val"]
    assert name == "val" and sources == val.en and references == val.de
