"""The shared source/target subword vocabulary: a sentencepiece unigram model (Kudo 2018; Kudo &
Richardson 2018) learned on the training split of both languages and saved in the run folder.

Why sentencepiece rather than Hugging Face tokenizers: it reads raw text and encodes whitespace as a
piece (``▁``), so decoding gives detokenized text directly, which is what sacreBLEU scores (no Moses
detokenizer to add); ``byte_fallback`` turns a character never seen in training into its UTF-8 byte
pieces instead of one lossy ``<unk>``; and the whole model is one small file (``spm.model``) that
`eval` and `translate` read back.

Text is NFKC-normalized on the way in (sentencepiece's ``nmt_nfkc`` rule: ``ŉ`` becomes ``ʼn``,
full-width letters become ASCII); otherwise decoding gives back the input.

Special ids: 0 pad, 1 unk, 2 bos, 3 eos.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from moe_apps.atomic import atomic_write

PAD, UNK, BOS, EOS = 0, 1, 2, 3
MODEL_FILE = "spm.model"


def train_vocab(sentences: Sequence[str], vocab_size: int, path: Path, *, seed: int = 0) -> Vocab:
    """Learn a unigram vocabulary of ``vocab_size`` pieces on ``sentences`` and write it to
    ``path`` atomically. Deterministic for the same sentences and seed (one thread)."""
    import sentencepiece as spm

    if not sentences:
        raise ValueError("cannot learn a vocabulary from no sentences")
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, num_threads=1, minloglevel=2,
        shuffle_input_sentence=False, max_sentence_length=8192,
    )
    data = buffer.getvalue()
    atomic_write(Path(path), lambda f: f.write(data))
    return Vocab(data, Path(path))


def load_vocab(path: Path) -> Vocab:
    """The vocabulary saved at ``path`` (ValueError if missing or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"the run has no vocabulary: {path} does not exist (was training killed "
                         "before it was written? start a fresh run)")
    return Vocab(path.read_bytes(), path)


class Vocab:
    """A loaded sentencepiece model: text <-> ids, and piece names for routing displays."""

    def __init__(self, data: bytes, path: Path | None = None) -> None:
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(data)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError on a bad file
            raise ValueError(f"{path or 'the vocabulary'} is not a sentencepiece model: {error}") from error
        ids = (self.processor.pad_id(), self.processor.unk_id(), self.processor.bos_id(),
               self.processor.eos_id())
        if ids != (PAD, UNK, BOS, EOS):
            raise ValueError(f"{path or 'the vocabulary'} has special ids {ids}, expected "
                             f"{(PAD, UNK, BOS, EOS)} (pad, unk, bos, eos)")

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """Subword ids of each line (no bos/eos)."""
        return self.processor.encode(list(lines), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized text of each id list (special ids dropped)."""
        return [self.processor.decode([i for i in row if i > EOS]) for row in ids]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The piece of each id, e.g. ``▁Mann``, ``<0xC3>`` for a byte-fallback piece."""
        return [self.processor.id_to_piece(int(i)) for i in ids]
