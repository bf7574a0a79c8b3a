"""Vision quality and speed on CIFAR-10: `moe` against `dense` (equal FLOPs per image) with the same
preset, epochs and recipe, over seeds; optionally `dense-wide` (moe's parameter count) once.

Each training runs in a fresh child process (so its peak memory is its own): test accuracy with
the default TTA, training wall time (evaluation excluded), training images/s and the child's
peak resident memory during training. Then ``--step-time`` times training steps (forward,
backward, optimizer step, batch 1024, the recipe's precision and memory format: bf16 autocast and
channels_last unless ``--recipe`` changes them) of moe and dense interleaved in one process, for
the step-time ratio. Prints a table and, for each model beside `dense`, its accuracy minus dense's
paired by seed (the target's comparison: same seed, same recipe), mean +- std and standard error
over the shared seeds (``--json``: one JSON object).

    python benchmarks/vision_quality.py --models moe dense --seeds 0 --step-time
    python benchmarks/vision_quality.py --step-time --no-train
    python benchmarks/vision_quality.py --models moe --recipe router_lr_scale=0.1
    python benchmarks/vision_quality.py --model-config num_experts=4 top_k=2 expert_width=128
    python benchmarks/vision_quality.py --preset tune --score val --models moe --seeds 0 1 --epochs 12

``--score val`` scores the held-out validation slice of the preset (``tune``: 5,000 of the training
images) instead of the test set, with and without TTA: how choices are made without touching the
test set.

``--recipe NAME=VALUE ...`` (the flag may also be repeated) changes a `RecipeConfig` field for
every run, ``--model-config NAME=VALUE ...`` a `ModelConfig` field (the dense twins are solved
against the changed moe; the step times use it too); values are read as JSON (0.1, true, 12,
[1, 2]) or else as text (gumbel); the changes are printed with the table and kept in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_steps import step_times  # noqa: E402


def config_changes(pairs: list[str], kind: type, flag: str, owned: dict[str, str]) -> dict:
    """``["router_lr_scale=0.1", "router=gumbel", ...]`` as a dict of ``kind``'s fields (values read
    as JSON where they are JSON, else as text; lists become tuples), checked by building ``kind``
    (a wrong type is refused there); ``owned``: fields another flag sets."""
    from dataclasses import fields

    known = {f.name for f in fields(kind)} - set(owned)
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if name in owned:
            sys.exit(f"{flag}: set {name} with {owned[name]}, not {flag} {name}=...")
        if not sep or name not in known:
            sys.exit(f"{flag} takes NAME=VALUE with NAME a {kind.__name__} field ({', '.join(sorted(known))}), "
                     f"got {pair!r}")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
        if isinstance(changes[name], list):
            changes[name] = tuple(changes[name])
    try:
        kind(**changes)
    except (TypeError, ValueError) as error:
        sys.exit(f"{flag}: {error}")
    return changes


def run_one(model: str, seed: int, preset: str, epochs: int | None, out: Path, data_dir: str | None,
            recipe: dict | None = None, model_config: dict | None = None, score: str = "test") -> dict:
    """Train one run in this process and score it (``score``: the test set, or the preset's
    validation slice with and without TTA); the numbers as a dict."""
    from dataclasses import replace

    from moe_apps.vision.config import get_preset, with_overrides
    from moe_apps.vision.data import make_splits
    from moe_apps.vision.train import eval_report, evaluate_model, train

    config = with_overrides(get_preset(preset), model=model, seed=seed, epochs=epochs)
    config = replace(config, recipe=replace(config.recipe, **(recipe or {})),
                     model=replace(config.model, **(model_config or {})))
    outcome = train(config, out, data_dir=data_dir, progress=False, evaluate=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    import torch

    from moe_apps.training import load_checkpoint
    from moe_apps.vision.model import build_model
    from moe_apps.vision.train import APP, model_config_dict

    net = build_model(config.model)
    load_checkpoint(out / "checkpoints" / "best.pt", net, app=APP, model_config=model_config_dict(config))
    data = make_splits(config, data_dir)
    scores = {"score": score}
    if score == "val":
        from moe_apps.vision.data import eval_batches
        from moe_apps.vision.task import predict

        for key, tta in (("accuracy", True), ("accuracy_one_view", False)):
            preds = predict(net, eval_batches(data.val, config.recipe.eval_batch_size), tta=tta,
                            device=torch.device("cpu"), precision=config.recipe.precision)
            report = eval_report(preds, data.val, data.class_names, config.model.num_experts, tta=tta)
            scores[key] = report["accuracy"]
    else:
        with torch.no_grad():
            scores["accuracy"] = evaluate_model(net.eval(), config, data, out, tta=True)["accuracy"]
    return {"model": model, "seed": seed, "epochs": config.recipe.epochs, **scores,
            "train_seconds": outcome.train_seconds, "images_per_second": outcome.images_per_second,
            "peak_train_mib": peak_mib, "parameters": outcome.parameters, "flops": outcome.flops}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["moe", "dense"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="Folder for the run folders (default: a temp dir).")
    parser.add_argument("--step-time", action="store_true", help="Also time moe vs dense steps interleaved.")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--no-train", action="store_true", help="Only the step-time measurement.")
    parser.add_argument("--recipe", nargs="+", action="extend", default=[], metavar="NAME=VALUE",
                        help="RecipeConfig changes for every run, e.g. router_lr_scale=0.1.")
    parser.add_argument("--model-config", nargs="+", action="extend", default=[], metavar="NAME=VALUE",
                        help="ModelConfig changes for every run, e.g. num_experts=4 top_k=2 expert_width=128.")
    parser.add_argument("--score", choices=["test", "val"], default="test",
                        help="Score the test set (default) or the preset's validation slice (tuning).")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="Print the table of results saved with --json, runs merged (nothing is run).")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from moe_apps.vision.config import ModelConfig, RecipeConfig

    recipe = config_changes(args.recipe, RecipeConfig, "--recipe", {"epochs": "--epochs"})
    model_config = config_changes(args.model_config, ModelConfig, "--model-config", {"model": "--models"})
    if args.score == "val" and not args.from_json and not args.no_train:
        from moe_apps.vision.config import get_preset

        try:
            held_out = get_preset(args.preset).validation
        except ValueError as error:
            sys.exit(f"--preset: {error}")
        if not held_out:
            sys.exit(f"--score val: the {args.preset!r} preset holds out no validation images; "
                     "use --preset tune (or smoke)")

    if args.from_json:
        saved = [json.loads(path.read_text()) for path in args.from_json]
        runs = [run for result in saved for run in result["runs"]]
        if len({run.get("score", "test") for run in runs}) > 1:  # saved before --score: test
            sys.exit("runs scored on the test set and on the validation slice cannot share a table; "
                     "merge them separately")
        timing = next((r["step_time"] for r in saved if r["step_time"]), None)
        for path, result in zip(args.from_json, saved, strict=True):
            print_changes(result, prefix=f"{path}: ")  # runs merged from different configs must say so
        print_table(summarise(runs, list(dict.fromkeys(r["model"] for r in runs))), timing)
        print_gaps(paired_gaps(runs))
        return
    if args.one:
        result = run_one(args.one[0], int(args.one[1]), args.preset, args.epochs, args.out, args.data_dir,
                         recipe, model_config, args.score)
        print("RESULT " + json.dumps(result), flush=True)
        return

    runs = []
    base = args.out or Path(tempfile.mkdtemp(prefix="vision-quality-"))
    if not args.no_train:
        for seed in args.seeds:
            for model in args.models:
                out = base / f"{model}-s{seed}"
                command = [sys.executable, __file__, "--one", model, str(seed), "--preset", args.preset,
                           "--out", str(out)]
                command += ["--epochs", str(args.epochs)] if args.epochs else []
                command += ["--data-dir", args.data_dir] if args.data_dir else []
                command += ["--recipe", *args.recipe] if args.recipe else []
                command += ["--model-config", *args.model_config] if args.model_config else []
                command += ["--score", args.score]
                print(f"training {model} seed {seed} -> {out}", file=sys.stderr, flush=True)
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    sys.exit(f"{model} seed {seed} failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(lines[-1][7:]))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    timing = (step_times(args.rounds, args.batch_size, args.data_dir, recipe, model_config)
              if args.step_time else None)

    summary = summarise(runs, args.models)
    result = {"preset": args.preset, "recipe": recipe, "model_config": model_config, "runs": runs,
              "summary": summary, "paired": paired_gaps(runs), "step_time": timing}
    if args.json:
        print(json.dumps(result))
        return
    print_changes(result)
    print_table(summary, timing)
    print_gaps(result["paired"])


def print_changes(result: dict, prefix: str = "") -> None:
    """The recipe and model-config changes a result was run with, a line each (none: nothing)."""
    for key, label in (("recipe", "recipe"), ("model_config", "model-config")):
        if result.get(key):
            print(f"{prefix}{label} changes: " + ", ".join(f"{k}={v}" for k, v in result[key].items()))


def summarise(runs: list[dict], models: list[str]) -> dict:
    """Per model: seeds, mean +- std accuracy (and each seed's), mean training time and images/s,
    max peak memory."""
    summary = {}
    for model in models:
        rows = [r for r in runs if r["model"] == model]
        if not rows:
            continue
        acc = [r["accuracy"] for r in rows]
        summary[model] = {
            "seeds": [r["seed"] for r in rows], "epochs": rows[0]["epochs"], "score": rows[0].get("score", "test"),
            "accuracy": acc, "accuracy_one_view": [r.get("accuracy_one_view") for r in rows],
            "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rows),
            "images_per_second_mean": statistics.mean(r["images_per_second"] for r in rows),
            "peak_train_mib_max": max(r["peak_train_mib"] for r in rows),
            "parameters": rows[0]["parameters"], "flops": rows[0]["flops"],
        }
    return summary


def paired_gaps(runs: list[dict], baseline: str = "dense") -> dict:
    """Per model beside `baseline`: accuracy minus the baseline's on each seed both ran for the same
    number of epochs (a seed run twice counts its last run), with mean, sample std and standard
    error of those differences."""
    by_model: dict[str, dict[tuple[int, int], float]] = {}
    for run in runs:
        by_model.setdefault(run["model"], {})[run["seed"], run["epochs"]] = run["accuracy"]
    base = by_model.get(baseline, {})
    gaps = {}
    for model, accuracy in by_model.items():
        shared = sorted(set(accuracy) & set(base))
        if model == baseline or not shared:
            continue
        seeds = [seed for seed, _ in shared]
        diffs = [accuracy[key] - base[key] for key in shared]
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        gaps[model] = {"baseline": baseline, "seeds": seeds, "differences": diffs,
                       "mean": statistics.mean(diffs), "std": std, "stderr": std / len(diffs) ** 0.5}
    return gaps


def print_gaps(gaps: dict) -> None:
    for model, g in gaps.items():
        per_seed = " / ".join(f"{100 * d:+.2f}" for d in g["differences"])
        print(f"{model} - {g['baseline']}, paired by seed ({', '.join(map(str, g['seeds']))}): {per_seed} points, "
              f"mean {100 * g['mean']:+.2f} +- {100 * g['std']:.2f} (standard error {100 * g['stderr']:.2f})")


def print_table(summary: dict, timing: dict | None) -> None:
    if summary:
        scored = next(iter(summary.values()))["score"]
        label, views = ("val. acc. (TTA)", "per seed (one view)") if scored == "val" else ("test acc. (TTA)", "per seed")
        print(f"| model | seeds | epochs | {label} mean +- std | {views} | train s | images/s | "
              "peak train RSS MiB | params | MMACs/image |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for model, s in summary.items():
            views = zip(s["accuracy"], s["accuracy_one_view"], strict=True)
            per_seed = " / ".join(f"{100 * a:.2f}" + (f" ({100 * b:.2f})" if b is not None else "") for a, b in views)
            print(f"| {model} | {len(s['seeds'])} ({', '.join(map(str, s['seeds']))}) | {s['epochs']} | "
                  f"{100 * s['accuracy_mean']:.2f} +- {100 * s['accuracy_std']:.2f}% | {per_seed} | "
                  f"{s['train_seconds_mean']:.0f} | {s['images_per_second_mean']:.0f} | "
                  f"{s['peak_train_mib_max']:.0f} | {s['parameters']:,} | {s['flops'] / 1e6:.1f} |")
    if timing:
        layout = f", {timing['precision']}{', channels_last' if timing['channels_last'] else ''}" if "precision" in timing else ""
        print(f"step time (batch {timing['batch_size']}{layout}, median of {timing['rounds']} interleaved rounds): "
              f"moe {1000 * timing['moe_s']:.0f} ms, dense {1000 * timing['dense_s']:.0f} ms, "
              f"ratio {timing['ratio']:.3f}")


if __name__ == "__main__":
    main()
