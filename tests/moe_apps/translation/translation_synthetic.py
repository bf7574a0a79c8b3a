"""A tiny synthetic Multi30k: word-for-word "German" and "English" sentences from one lexicon,
written as the data layer's gzipped files (``multi30k/<split>.<lang>.gz``), so that the app's real
loading path runs and a smoke model can learn something in seconds."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

LEXICON = {
    "ein": "a", "mann": "man", "frau": "woman", "hund": "dog", "kind": "child", "fährt": "rides",
    "läuft": "runs", "sieht": "sees", "fahrrad": "bike", "ball": "ball", "straße": "street",
    "rot": "red", "groß": "big", "klein": "small", "grün": "green", "über": "over", "die": "the",
    "zwei": "two", "spielt": "plays", "wasser": "water",
}
SPLITS = {"train": 240, "val": 24, "test_2016_flickr": 16}


def sentence_pair(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(sorted(LEXICON)) for _ in range(rng.randint(3, 7))]
    de = " ".join(words).capitalize() + "."
    en = " ".join(LEXICON[w] for w in words).capitalize() + "."
    return de, en


def write_synthetic_multi30k(root: Path, seed: int = 0) -> Path:
    """Write the three required splits under ``root/multi30k`` and return ``root``."""
    rng = random.Random(seed)
    folder = root / "multi30k"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        pairs = [sentence_pair(rng) for _ in range(count)]
        for index, language in enumerate(("de", "en")):
            text = "".join(pair[index] + "\n" for pair in pairs)
            (folder / f"{split}.{language}.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    return root
