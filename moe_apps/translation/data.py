"""Parallel text -> typed batches: token-count batches with length bucketing, an endless
deterministic stream of shuffled passes for training, and the reader of user test files.

Batches hold ``sentences * max(source length, target length + 1)`` padded tokens at most (the
batch-by-tokens of fairseq / tensor2tensor): pairs are sorted by length with a seeded random
tie-break, cut into batches, and the batch order is shuffled per pass. Everything depends only on
(seed, pass), which the shared loop's exact resume needs.

Shape legend: B sentences, S source length, T target length.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe_apps.translation.vocab import BOS, EOS, PAD


@dataclass(frozen=True)
class TranslationBatch:
    """Source ids (with eos), decoder input (bos + target) and output (target + eos), pad 0."""

    src_BS: Tensor
    tgt_in_BT: Tensor
    tgt_out_BT: Tensor

    def to(self, device: torch.device | str) -> TranslationBatch:
        return TranslationBatch(self.src_BS.to(device), self.tgt_in_BT.to(device),
                                self.tgt_out_BT.to(device))

    def __len__(self) -> int:
        return self.src_BS.shape[0]

    @property
    def target_tokens(self) -> int:
        return int((self.tgt_out_BT != PAD).sum())


@dataclass(frozen=True)
class EncodedPairs:
    """Subword ids of aligned sentences (no specials)."""

    src: list[list[int]]
    tgt: list[list[int]]

    def __post_init__(self) -> None:
        if len(self.src) != len(self.tgt):
            raise ValueError(f"{len(self.src)} source but {len(self.tgt)} target sentences")

    def __len__(self) -> int:
        return len(self.src)

    def filtered(self, max_tokens: int) -> EncodedPairs:
        """Only the pairs whose source and target (with eos) fit ``max_tokens``."""
        keep = [i for i in range(len(self)) if len(self.src[i]) < max_tokens and len(self.tgt[i]) < max_tokens]
        return EncodedPairs([self.src[i] for i in keep], [self.tgt[i] for i in keep])


def pad_rows(rows: Sequence[Sequence[int]]) -> Tensor:
    """(B, max length) int64, padded with PAD."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), PAD, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    return out


def make_batch(pairs: EncodedPairs, indices: Sequence[int]) -> TranslationBatch:
    src = [pairs.src[i] + [EOS] for i in indices]
    tgt_in = [[BOS] + pairs.tgt[i] for i in indices]
    tgt_out = [pairs.tgt[i] + [EOS] for i in indices]
    return TranslationBatch(pad_rows(src), pad_rows(tgt_in), pad_rows(tgt_out))


def source_batch(rows: Sequence[Sequence[int]]) -> Tensor:
    """Source ids with eos appended, padded: what the encoder reads at inference."""
    return pad_rows([list(r) + [EOS] for r in rows])


def bucket_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int,
                   rng: np.random.Generator | None) -> list[np.ndarray]:
    """Indices of each batch: pairs sorted by (source, target) length (random tie-break when
    ``rng`` is given), cut so that ``len(batch) * max(source + 1, target + 1) <= max_tokens``."""
    src_cost, tgt_cost = np.asarray(src_lens) + 1, np.asarray(tgt_lens) + 1
    noise = rng.random(len(src_cost)) if rng is not None else np.arange(len(src_cost))
    order = np.lexsort((noise, tgt_cost, src_cost))
    batches, start, width = [], 0, 0
    for pos, index in enumerate(order):
        new_width = max(width, src_cost[index], tgt_cost[index])
        if pos > start and new_width * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, new_width = pos, max(src_cost[index], tgt_cost[index])
        width = new_width
    if start < len(order):
        batches.append(order[start:])
    return batches


class TrainStream:
    """``stream(epoch)`` -> the ``updates_per_epoch`` batches of that epoch, taken from an endless
    sequence of passes; pass p is bucketed and shuffled with seed ``(seed, p)``."""

    def __init__(self, pairs: EncodedPairs, max_tokens: int, updates_per_epoch: int, seed: int) -> None:
        if len(pairs) == 0:
            raise ValueError("the training set is empty (after dropping pairs longer than "
                             "max_source_tokens)")
        self.pairs, self.max_tokens, self.updates, self.seed = pairs, max_tokens, updates_per_epoch, seed
        self.src_lens = np.array([len(s) for s in pairs.src])
        self.tgt_lens = np.array([len(t) for t in pairs.tgt])
        self._passes: dict[int, list[np.ndarray]] = {}

    def batches_of_pass(self, index: int) -> list[np.ndarray]:
        if index not in self._passes:
            rng = np.random.default_rng([self.seed, index])
            batches = bucket_batches(self.src_lens, self.tgt_lens, self.max_tokens, rng)
            self._passes = {index: [batches[i] for i in rng.permutation(len(batches))]}
        return self._passes[index]

    @property
    def batches_per_pass(self) -> int:
        return len(self.batches_of_pass(0))

    def __call__(self, epoch: int) -> _EpochBatches:
        return _EpochBatches(self, epoch)


@dataclass(frozen=True)
class _EpochBatches:
    stream: TrainStream
    epoch: int

    def __len__(self) -> int:
        return self.stream.updates

    def __iter__(self) -> Iterator[TranslationBatch]:
        per_pass = self.stream.batches_per_pass
        first = self.epoch * self.stream.updates
        for step in range(first, first + self.stream.updates):
            indices = self.stream.batches_of_pass(step // per_pass)[step % per_pass]
            yield make_batch(self.stream.pairs, indices.tolist())


def eval_batches(pairs: EncodedPairs, max_tokens: int) -> list[TranslationBatch]:
    """Teacher-forced batches for the validation loss, bucketed without shuffling."""
    order = bucket_batches(np.array([len(s) for s in pairs.src]),
                           np.array([len(t) for t in pairs.tgt]), max_tokens, None)
    return [make_batch(pairs, b.tolist()) for b in order]


def read_text_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, plain or gzipped (by its .gz suffix or magic bytes), with a
    one-line ValueError naming the file when it cannot be read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error
    if raw[:2] == b"\x1f\x8b" or path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{path} is not a readable gzip file ({error})") from error
    return split_lines(raw, path)


def split_lines(raw: bytes, name: str | Path) -> list[str]:
    """The lines of UTF-8 ``raw`` (a file's or stdin's bytes): split at "\n" only, so a form feed
    or U+2028 inside a line stays in it (`str.splitlines` would cut there and misalign outputs with
    inputs), a trailing "\r" dropped, no empty last line after a final newline, a leading
    byte-order mark dropped. A one-line ValueError naming ``name`` and the line when the bytes are
    not UTF-8."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1  # error.object: the bytes after a BOM
        byte = error.start + len(raw) - len(error.object)
        raise ValueError(f"{name} is not UTF-8 text (line {line}, byte {byte}); convert it to "
                         "UTF-8, e.g. with iconv") from error
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_parallel_files(src_path: str | Path, ref_path: str | Path) -> tuple[list[str], list[str]]:
    """Aligned (sources, references) from two files; ValueError when their line counts differ."""
    sources, references = read_text_lines(src_path), read_text_lines(ref_path)
    if len(sources) != len(references):
        raise ValueError(f"{src_path} has {len(sources)} lines but {ref_path} has {len(references)}; "
                         "source and reference files must have one line per sentence, aligned")
    if not sources:
        raise ValueError(f"{src_path} is empty; nothing to score")
    return sources, references
