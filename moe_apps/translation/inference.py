"""Use a trained translation run (what `moe-apps translation eval / translate` call): load its
vocabulary and weights, translate lines, score them with sacreBLEU, and show the experts of each
token.

Weights: ``checkpoints/best.pt`` (lowest validation loss), or with ``average=N`` the element-wise
mean of the last N epoch snapshots the run kept (``checkpoints/epoch-NNNN.pt``,
``TrainConfig.snapshots``): checkpoint averaging as in Vaswani et al. 2017. Scores are sacreBLEU
(Post 2018) BLEU and chrF on detokenized, cased text against the raw references (13a tokenization),
with the lowercased BLEU and the length ratio beside them. `evaluate` writes its hypotheses to
``hypotheses/<name>.beam<K>[.avg<N>].txt`` and its scores to ``eval/<name>.beam<K>[.avg<N>].json``.

Everything runs under the run's training precision (bf16 autocast on the CPU), `routing_of` too,
so the experts it shows are those the translation used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_apps.atomic import atomic_write
from moe_apps.datasets import load_multi30k, resolve_data_root
from moe_apps.training.checkpoint import (
    average_checkpoints,
    check_compatible,
    list_snapshots,
    load_checkpoint,
    read_checkpoint,
)
from moe_apps.training.run import RunError, open_run
from moe_apps.training.runtime import autocast, resolve_device
from moe_apps.translation.config import TranslationConfig
from moe_apps.translation.data import read_parallel_files
from moe_apps.translation.decode import beam_decode
from moe_apps.translation.model import Seq2SeqTransformer, build_model
from moe_apps.translation.vocab import MODEL_FILE, Vocab, load_vocab

APP = "translation"


@dataclass(frozen=True)
class LoadedRun:
    """A run ready to translate: its config, vocabulary, model (eval mode) and the checkpoint files
    whose weights the model holds (``best.pt``, or the averaged snapshots, oldest first)."""

    run_dir: Path
    config: TranslationConfig
    data_root: Path | None
    vocab: Vocab
    model: Seq2SeqTransformer
    checkpoints: tuple[Path, ...]
    average: int | None = None


def snapshots_to_average(run_dir: Path, config: TranslationConfig, count: int) -> list[Path]:
    """The last ``count`` epoch snapshots of a run, oldest first; a one-line RunError when the run
    kept none or fewer."""
    if count < 1:
        raise ValueError(f"--average must be >= 1, got {count}")
    kept = list_snapshots(run_dir)
    if not kept:
        raise RunError(
            f"{run_dir} has no epoch snapshots (checkpoints/epoch-*.pt) to average: its config keeps "
            f"train.snapshots={config.train.snapshots}; score best.pt without --average, or train with "
            "a preset that keeps snapshots (the default preset keeps 5)")
    if len(kept) < count:
        raise RunError(f"{run_dir} keeps {len(kept)} epoch snapshots ({kept[0].name} .. {kept[-1].name}), "
                       f"fewer than --average {count}; average at most {len(kept)}")
    return kept[-count:]


def load_run(run_dir: str | Path, *, device: str = "auto", average: int | None = None) -> LoadedRun:
    """A finished (or running) translation run's vocabulary and weights, in eval mode: best.pt, or
    the mean of the last ``average`` epoch snapshots."""
    info = open_run(run_dir, app=APP)
    config = TranslationConfig.from_dict(info.config)
    vocab = load_vocab(info.run_dir / MODEL_FILE)
    model = build_model(config.model)
    model_config = asdict(config.model)
    if average is None:
        checkpoints = [info.checkpoint("best")]
        load_checkpoint(checkpoints[0], model, app=APP, model_config=model_config)
    else:
        checkpoints = snapshots_to_average(info.run_dir, config, average)
        check_compatible(read_checkpoint(checkpoints[-1]), checkpoints[-1], app=APP, model_config=model_config)
        try:
            model.load_state_dict(average_checkpoints(checkpoints))
        except RuntimeError as error:
            raise ValueError(f"the snapshots of {info.run_dir} do not fit this model's parameters: "
                             f"{' '.join(str(error).split())}") from error
    model.to(resolve_device(device)).eval()
    return LoadedRun(info.run_dir, config, info.data_root, vocab, model, tuple(checkpoints), average)


@dataclass(frozen=True)
class Translations:
    """Decoded lines, in input order, and what was truncated."""

    lines: list[str]
    ids: list[list[int]]
    source_ids: list[list[int]]
    truncated: int
    seconds: float


def _check_utf8(lines: Sequence[str]) -> None:
    """ValueError naming the first line that cannot be UTF-8 (a lone surrogate: bytes the shell or
    Python's surrogateescape could not decode)."""
    for number, line in enumerate(lines, 1):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"line {number} is not UTF-8 text (character {error.start + 1} came from "
                             "undecodable bytes); convert the input to UTF-8, e.g. with iconv") from error


def translate_lines(run: LoadedRun, lines: Sequence[str], *, beam: int | None = None,
                    length_penalty: float | None = None) -> Translations:
    """Translate ``lines``: an empty (or blank) line gives an empty line; a line of more than
    ``max_source_tokens - 1`` subwords is truncated to them (counted in ``truncated``); characters
    never seen in training go in as UTF-8 byte pieces. Sentences are decoded in batches sorted by
    length."""
    _check_utf8(lines)
    decode = run.config.decode
    beam = decode.beam if beam is None else beam
    penalty = decode.length_penalty if length_penalty is None else length_penalty
    limit = run.config.model.max_source_tokens - 1  # leave room for eos
    encoded = run.vocab.encode([line.strip() for line in lines])
    truncated = sum(len(ids) > limit for ids in encoded)
    encoded = [ids[:limit] for ids in encoded]
    order = sorted((i for i in range(len(encoded)) if encoded[i]), key=lambda i: len(encoded[i]))
    outputs: list[list[int]] = [[] for _ in encoded]
    device = next(run.model.parameters()).device
    started = time.perf_counter()
    with autocast(device, run.config.train.precision):
        for start in range(0, len(order), decode.batch_sentences):
            chunk = order[start : start + decode.batch_sentences]
            hyps = beam_decode(run.model, [encoded[i] for i in chunk], beam=beam, length_penalty=penalty,
                               max_len_a=decode.max_len_a, max_len_b=decode.max_len_b)
            for i, hyp in zip(chunk, hyps, strict=True):
                outputs[i] = hyp
    seconds = time.perf_counter() - started
    texts = [text if encoded[i] else "" for i, text in enumerate(run.vocab.decode(outputs))]
    return Translations(texts, outputs, encoded, truncated, seconds)


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU BLEU, chrF (and signatures), lowercased BLEU and the length ratio."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf, lower = BLEU(), CHRF(), BLEU(lowercase=True)
    refs = [list(references)]
    b = bleu.corpus_score(list(hypotheses), refs)
    c = chrf.corpus_score(list(hypotheses), refs)
    lowered = lower.corpus_score(list(hypotheses), refs)
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "bleu_lowercase": lowered.score,
            "length_ratio": b.sys_len / b.ref_len if b.ref_len else 0.0}


def evaluation_set(run: LoadedRun, *, split: str | None, src: str | Path | None, ref: str | Path | None,
                   data_dir: str | Path | None = None) -> tuple[str, list[str], list[str]]:
    """(name, sources, references) of a Multi30k split in the run's direction, or of two files."""
    if (src is None) != (ref is None):
        raise ValueError("--src and --ref go together: give both files (source and reference)")
    if src is not None:
        if split is not None:
            raise ValueError("give either --split or --src/--ref, not both")
        sources, references = read_parallel_files(src, ref)
        return Path(src).name.removesuffix(".gz"), sources, references
    split = split or "test_2016_flickr"
    if split == "train":
        raise ValueError("--split train is the data the run learned from; score val or a test split")
    root = resolve_data_root(data_dir if data_dir is not None else run.data_root)
    pairs = load_multi30k(root, [split])[split]
    source, target = run.config.data.languages
    return split, list(getattr(pairs, source)), list(getattr(pairs, target))


def result_stem(run: LoadedRun, name: str, beam: int) -> str:
    """``<name>.beam<K>`` for best.pt, ``<name>.beam<K>.avg<N>`` for averaged weights."""
    return f"{name}.beam{beam}" + (f".avg{run.average}" if run.average is not None else "")


def evaluate(run: LoadedRun, name: str, sources: Sequence[str], references: Sequence[str], *,
             beam: int | None = None) -> dict[str, Any]:
    """Translate and score; hypotheses to ``hypotheses/<stem>.txt``, scores to ``eval/<stem>.json``
    in the run folder (`result_stem`). The scores say which weights were scored: ``weights``
    ("best" | "average"), ``average`` (N or None) and ``checkpoints`` (file names)."""
    beam = run.config.decode.beam if beam is None else beam
    result = translate_lines(run, sources, beam=beam)
    scores = score(result.lines, references)
    scores.update({"sentences": len(sources), "decode_seconds": result.seconds,
                   "sentences_per_s": len(sources) / result.seconds if result.seconds > 0 else 0.0,
                   "beam": beam, "truncated_sources": result.truncated, "name": name,
                   "direction": run.config.data.direction,
                   "weights": "best" if run.average is None else "average", "average": run.average,
                   "checkpoints": [path.name for path in run.checkpoints]})
    stem = result_stem(run, name, beam)
    text = "".join(line + "\n" for line in result.lines)
    atomic_write(run.run_dir / "hypotheses" / f"{stem}.txt", lambda f: f.write(text.encode()))
    payload = json.dumps(scores, indent=2, sort_keys=True) + "\n"
    atomic_write(run.run_dir / "eval" / f"{stem}.json", lambda f: f.write(payload.encode()))
    return scores


@torch.no_grad()
def routing_of(run: LoadedRun, source_ids: list[int], output_ids: list[int]) -> dict[str, Any]:
    """Which experts each source subword went to in each encoder MoE layer, and each generated
    token (the decoder step that produced it, eos included) in each decoder MoE layer: one
    teacher-forced pass under the precision `translate_lines` decodes with."""
    from moe_apps.translation.data import TranslationBatch, pad_rows
    from moe_apps.translation.vocab import BOS, EOS

    model, device = run.model, next(run.model.parameters()).device
    src_BS = pad_rows([list(source_ids) + [EOS]]).to(device)
    tgt_in_BT = pad_rows([[BOS] + list(output_ids)]).to(device)
    layers = model.moe_layers()
    for _, ffn in layers:
        ffn.record_routing = True
    try:
        with autocast(device, run.config.train.precision):
            model(TranslationBatch(src_BS, tgt_in_BT, tgt_in_BT))
        table = {name: _experts_per_token(*ffn.last_routing) for name, ffn in layers}
    finally:
        for _, ffn in layers:
            ffn.record_routing, ffn.last_routing = False, None
    return {"source": run.vocab.pieces(list(source_ids) + [EOS]),
            "target": run.vocab.pieces(list(output_ids) + [EOS]), "layers": table}


def _experts_per_token(routing: Any, mask_BN: Tensor) -> list[list[int]]:
    """Per real token (flattened order), the experts it went to (best first for token choice)."""
    T = int(mask_BN.sum())
    if routing.expert_indices_TK is not None:
        return routing.expert_indices_TK.tolist()
    chosen: list[list[int]] = [[] for _ in range(T)]
    for e, tokens in enumerate(routing.token_indices_EC.tolist()):
        for t in tokens:
            chosen[t].append(e)
    return chosen
