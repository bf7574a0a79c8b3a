"""Translation data and configs: token-count bucketing, the deterministic training stream, batch
layout, user text files, the sentencepiece vocabulary (byte fallback, lossless detokenization),
config round trips and the presets."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from translation_synthetic import LEXICON

from moe_apps.translation.config import PRESETS, ModelConfig, TranslationConfig, get_preset
from moe_apps.translation.data import (
    EncodedPairs,
    TrainStream,
    bucket_batches,
    make_batch,
    read_parallel_files,
    read_text_lines,
)
from moe_apps.translation.vocab import BOS, EOS, PAD, load_vocab, train_vocab


def test_buckets_cover_every_pair_once_within_the_token_budget() -> None:
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = bucket_batches(src, tgt, 300, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for batch in batches:
        width = max(src[batch].max(), tgt[batch].max()) + 1
        assert len(batch) == 1 or len(batch) * width <= 300
    # bucketing keeps padding small: sources in a batch have similar lengths
    assert np.mean([src[b].max() - src[b].min() for b in batches]) < 5


def test_stream_is_a_function_of_seed_and_epoch() -> None:
    pairs = EncodedPairs([[4 + i % 7] * (1 + i % 9) for i in range(200)], [[5] * (1 + i % 5) for i in range(200)])
    a, b = TrainStream(pairs, 64, 7, seed=3), TrainStream(pairs, 64, 7, seed=3)
    first = [batch.src_BS for batch in a(2)]
    assert len(first) == 7 == len(a(2))
    for x, y in zip(first, [batch.src_BS for batch in b(2)], strict=True):
        assert torch.equal(x, y)
    other = [batch.src_BS for batch in TrainStream(pairs, 64, 7, seed=4)(2)]
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(first, other, strict=True))
    # epochs walk through passes: every pair is seen once per pass
    per_pass = a.batches_per_pass
    seen = [i for step in range(per_pass) for i in a.batches_of_pass(0)[step].tolist()]
    assert sorted(seen) == list(range(200))


def test_batch_layout_bos_eos_and_padding() -> None:
    batch = make_batch(EncodedPairs([[7, 8], [9]], [[10], [11, 12, 13]]), [0, 1])
    assert batch.src_BS.tolist() == [[7, 8, EOS], [9, EOS, PAD]]
    assert batch.tgt_in_BT.tolist() == [[BOS, 10, PAD, PAD], [BOS, 11, 12, 13]]
    assert batch.tgt_out_BT.tolist() == [[10, EOS, PAD, PAD], [11, 12, 13, EOS]]
    assert batch.target_tokens == 6


def test_text_files_plain_gzip_and_errors(tmp_path: Path) -> None:
    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    plain.write_text("eins\r\nzwei\n")
    packed.write_bytes(gzip.compress(b"one\ntwo\n"))
    assert read_text_lines(plain) == ["eins", "zwei"]
    assert read_parallel_files(plain, packed) == (["eins", "zwei"], ["one", "two"])
    bad = tmp_path / "c.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_lines(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_text_lines(tmp_path / "missing.txt")
    bom = tmp_path / "e.txt"  # Windows editors start UTF-8 files with a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbfeins\r\nzwei\r\n")
    assert read_text_lines(bom) == ["eins", "zwei"]
    broken = tmp_path / "d.gz"
    broken.write_bytes(gzip.compress(b"x\n")[:-4])
    with pytest.raises(ValueError, match="gzip"):
        read_text_lines(broken)


def test_vocabulary_is_lossless_with_byte_fallback(tmp_path: Path) -> None:
    sentences = [f"{de.capitalize()} {en}." for de, en in LEXICON.items()] * 5
    vocab = train_vocab(sentences, 400, tmp_path / "spm.model")
    again = load_vocab(tmp_path / "spm.model")
    line = "Ein Hund sieht 猫 und ж."  # NFKC-stable characters (the vocabulary normalizes NFKC)
    ids = again.encode([line])[0]
    assert again.decode([ids]) == [line]  # characters never seen come back from their bytes
    assert any(piece.startswith("<0x") for piece in again.pieces(ids))
    assert vocab.encode([line]) == again.encode([line]) and min(ids) > EOS
    assert train_vocab(sentences, 400, tmp_path / "again.model").encode([line]) == vocab.encode([line])


def test_config_round_trip_and_presets() -> None:
    for name in PRESETS:
        config = get_preset(name)
        assert TranslationConfig.from_dict(config.to_dict()) == config
    assert get_preset("compare").total_updates == 240
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="router must be"):
        ModelConfig(router="soft")
    assert ModelConfig(router="topk", top_k=2, expert_hidden=512).dense_hidden == 1024
    assert ModelConfig(router="switch", shared_expert=True, expert_hidden=512).dense_hidden == 1024
