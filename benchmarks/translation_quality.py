"""Translation quality and speed on Multi30k: the MoE model against its dense twin (same active
FLOPs per token), trained one after the other with the same preset, updates and recipe.

For each model: train (`moe_apps.translation.train.train`, the same code as `moe-apps translation
train`), then decode the test split with beam search and score it with sacreBLEU. Columns: BLEU,
chrF and lowercased BLEU (detokenized, cased, 13a), sacreBLEU's length ratio, training wall time
(the loop's epochs, validation included), training target tokens/s, decoding sentences/s (beam
search over the whole split, batches sorted by length). With ``--average N`` the run keeps its
last N validations' weights and the mean of them (checkpoint averaging, `eval --average N`) is
scored too: columns ``avg_bleu``, ``avg_chrf``, ``avg_bleu_lowercase``, ``avg_length_ratio`` beside
best.pt's. Prints a table (``--json``: one JSON list).

    python benchmarks/translation_quality.py --preset compare --models moe dense --out runs/translation-bench
    python benchmarks/translation_quality.py --preset compare --direction en-de
    python benchmarks/translation_quality.py --preset default --models moe --average 5
    python benchmarks/translation_quality.py --step-time --rounds 8   # seconds per update only

``--step-time`` times training updates (forward, backward, AdamW step; bf16 autocast; the preset's
token batches of the real training split) of moe and dense interleaved in one process: median
seconds per update and target tokens/s, what the presets' update counts are sized from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

AVERAGED = ("bleu", "chrf", "bleu_lowercase", "length_ratio")  # scores of --average, as avg_<key>


def config_for(model: str, args: argparse.Namespace) -> Any:  # a TranslationConfig (imported lazily)
    """The preset with the command line's overrides; with ``--average N`` it keeps at least N
    snapshots (keeping weights does not change training)."""
    from moe_apps.training.run import apply_overrides
    from moe_apps.translation.config import get_preset

    base = get_preset(args.preset)
    snapshots = max(base.train.snapshots, args.average) if args.average else None
    return apply_overrides(base, {
        "model.model": model, "data.direction": args.direction, "train.epochs": args.epochs,
        "train.seed": args.seed, "train.snapshots": snapshots})


def run_one(model: str, args: argparse.Namespace, out: Path) -> dict:
    """Train one model into ``out`` and score its best checkpoint (and with ``--average N`` the mean
    of its last N snapshots); the numbers as a dict."""
    from moe_apps.translation.inference import evaluate, evaluation_set, load_run
    from moe_apps.translation.train import train

    config = config_for(model, args)
    started = time.perf_counter()
    outcome = train(config, out, data_dir=args.data_dir, progress=False)
    wall = time.perf_counter() - started
    summary = json.loads((out / "train_summary.json").read_text())
    run = load_run(out)
    name, sources, references = evaluation_set(run, split=args.split, src=None, ref=None, data_dir=args.data_dir)
    scores = evaluate(run, name, sources, references, beam=args.beam)
    row = {
        "model": model, "direction": args.direction, "preset": args.preset, "updates": config.total_updates,
        "split": name, "beam": args.beam, "bleu": scores["bleu"], "chrf": scores["chrf"],
        "bleu_lowercase": scores["bleu_lowercase"], "length_ratio": scores["length_ratio"],
        "train_seconds": summary["epochs_seconds"], "train_wall_seconds": wall,
        "train_target_tokens_per_s": summary["target_tokens_per_s"],
        "val_loss": outcome.val_metrics["loss"], "decode_seconds": scores["decode_seconds"],
        "sentences_per_s": scores["sentences_per_s"], "parameters": outcome.parameters["total"],
        "bleu_signature": scores["bleu_signature"], "run_dir": str(out),
    }
    if args.average:
        averaged = evaluate(load_run(out, average=args.average), name, sources, references, beam=args.beam)
        row.update({"average": args.average, "avg_checkpoints": averaged["checkpoints"],
                    **{f"avg_{key}": averaged[key] for key in AVERAGED}})
    return row


def step_times(args: argparse.Namespace) -> list[dict]:
    """Median seconds per training update of each model (interleaved rounds, 2 warm-up updates)."""
    import statistics

    import torch

    from moe_apps.datasets import load_multi30k
    from moe_apps.training.run import apply_overrides
    from moe_apps.translation.config import get_preset
    from moe_apps.translation.data import EncodedPairs, TrainStream
    from moe_apps.translation.model import build_model, count_parameters
    from moe_apps.translation.task import TranslationTask
    from moe_apps.translation.vocab import train_vocab
    from moe_core import collect_aux_losses, weighted_aux_loss

    base = apply_overrides(get_preset(args.preset), {"data.direction": args.direction})
    pairs = load_multi30k(args.data_dir, ["train"])["train"]
    source, target = base.data.languages
    src, tgt = getattr(pairs, source), getattr(pairs, target)
    with tempfile.TemporaryDirectory() as scratch:
        vocab = train_vocab(src + tgt, base.model.vocab_size, Path(scratch) / "spm.model")
    encoded = EncodedPairs(vocab.encode(src), vocab.encode(tgt)).filtered(base.model.max_source_tokens)
    stream = TrainStream(encoded, base.data.batch_tokens, args.rounds + 2, 0)
    batches = list(stream(0))
    runs = {}
    for model in args.models:
        config = apply_overrides(base, {"model.model": model})
        torch.manual_seed(0)
        net = build_model(config.model).train()
        runs[model] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4), TranslationTask(config.label_smoothing),
                       count_parameters(net)["total"], [])
    coefficients = dict(base.train.aux_loss_coefficients)
    for index, batch in enumerate(batches):
        for net, optimizer, task, _, times in runs.values():
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = task.training_loss(net, batch)
                aux = collect_aux_losses(net)
                loss = loss + weighted_aux_loss(aux, coefficients) if aux else loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if index >= 2:
                times.append((time.perf_counter() - started, batch.target_tokens))
    rows = []
    for model, (_, _, _, parameters, times) in runs.items():
        seconds = statistics.median(t for t, _ in times)
        rows.append({"model": model, "updates_timed": len(times), "seconds_per_update": seconds,
                     "target_tokens_per_s": sum(n for _, n in times) / sum(t for t, _ in times),
                     "batch_tokens": base.data.batch_tokens, "parameters": parameters,
                     "threads": torch.get_num_threads()})
    return rows


def print_table(rows: list[dict]) -> None:
    columns = [("model", "{}"), ("direction", "{}"), ("updates", "{}"), ("bleu", "{:.2f}"),
               ("chrf", "{:.2f}"), ("bleu_lowercase", "{:.2f}"), ("length_ratio", "{:.3f}"),
               ("train_seconds", "{:.0f}"), ("train_target_tokens_per_s", "{:.0f}"),
               ("decode_seconds", "{:.1f}"), ("sentences_per_s", "{:.1f}"), ("parameters", "{:,}")]
    if rows and "average" in rows[0]:
        columns[7:7] = [(f"avg_{key}", "{:.3f}" if key == "length_ratio" else "{:.2f}") for key in AVERAGED]
    cells = [[name for name, _ in columns]] + [[fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    if rows:
        print(rows[0]["bleu_signature"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    parser.add_argument("--preset", default="compare")
    parser.add_argument("--direction", default="de-en", choices=["de-en", "en-de"])
    parser.add_argument("--epochs", type=int, default=None, help="Override the preset's epochs.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--split", default="test_2016_flickr")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--average", type=int, default=None, metavar="N",
                        help="Also score the mean weights of the last N validations (kept as snapshots).")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="Folder for the run folders (default: a temp dir).")
    parser.add_argument("--step-time", action="store_true", help="Only time training updates (see above).")
    parser.add_argument("--rounds", type=int, default=8, help="Timed updates per model with --step-time.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.step_time:
        rows = step_times(args)
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                print(f"{row['model']:>5}  {row['seconds_per_update']:.2f} s/update  "
                      f"{row['target_tokens_per_s']:.0f} target tokens/s  {row['parameters']:,} parameters  "
                      f"({row['updates_timed']} updates of <= {row['batch_tokens']} tokens, {row['threads']} threads)")
        return
    if args.average is not None:
        epochs = config_for(args.models[0], args).train.epochs
        if not 1 <= args.average <= epochs:
            parser.error(f"--average {args.average}: the {args.preset} preset validates {epochs} times; "
                         f"average 1 to {epochs} of them")
    with tempfile.TemporaryDirectory() as scratch:
        base = args.out if args.out is not None else Path(scratch)
        rows = []
        for model in args.models:
            print(f"training {model} ({args.preset}, {args.direction})", file=sys.stderr, flush=True)
            rows.append(run_one(model, args, base / f"{model}-{args.direction}-{args.preset}"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
