"""Multi30k task 1 (Elliott et al. 2016), German-English: a checked loader of aligned pairs.

`load_multi30k(root, splits)` reads the raw gzipped files `multi30k/<split>.<lang>.gz` of the
multi30k/dataset repository (one sentence per line, UTF-8) and returns one `TranslationPairs` per
split: `de[i]` and `en[i]` are translations of each other.

Checked: gzip integrity (a truncated file fails), UTF-8, no empty line inside a file, and the same
number of lines in the German and English files of a split. Failures raise `DatasetError` naming
the file and line.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_apps.datasets.errors import DatasetError, MissingDataError
from moe_apps.datasets.files import decode_lines, require_files
from moe_apps.datasets.paths import resolve_data_root
from moe_apps.datasets.registry import (
    MULTI30K_OPTIONAL_SPLITS,
    MULTI30K_SPLITS,
    get_spec,
    multi30k_files,
)


@dataclass(frozen=True)
class TranslationPairs:
    """Aligned sentences of one split: `de[i]` translates to `en[i]`."""

    split: str
    de: list[str]
    en: list[str]

    def __post_init__(self) -> None:
        if len(self.de) != len(self.en):
            raise ValueError(f"split {self.split!r}: {len(self.de)} German but {len(self.en)} "
                             "English sentences; they must be aligned one to one")

    def __len__(self) -> int:
        return len(self.de)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return zip(self.de, self.en, strict=True)

    def pairs(self) -> list[tuple[str, str]]:
        """The (de, en) pairs as a list."""
        return list(self)


def read_gzip_lines(path: Path) -> list[str]:
    """The lines of a gzipped UTF-8 file; an empty line or a truncated gzip is a DatasetError."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError as error:
        raise DatasetError("file is missing", path=path) from error
    except (EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"truncated or corrupt gzip ({error}); delete it and download it "
                           "again", path=path) from error
    lines = decode_lines(raw, path, "utf-8")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DatasetError("empty sentence (lines of the de and en files must pair up)",
                               path=path, line=number)
    return lines


def available_splits(root: Path) -> tuple[str, ...]:
    """The required splits plus those optional test splits whose two files are both present."""
    optional = tuple(
        split for split in MULTI30K_OPTIONAL_SPLITS
        if all((root / name).is_file() for name in multi30k_files((split,)))
    )
    return MULTI30K_SPLITS + optional


def load_multi30k(
    root: str | Path | None = None, splits: Sequence[str] | None = None
) -> dict[str, TranslationPairs]:
    """Load Multi30k en-de: `{split: TranslationPairs}` in the order of `splits`.

    `splits=None` loads train, val, test_2016_flickr and the test_2017 sets that are present.
    Known splits: train, val, test_2016_flickr, test_2017_flickr, test_2017_mscoco.
    """
    known = MULTI30K_SPLITS + MULTI30K_OPTIONAL_SPLITS
    if isinstance(splits, str):
        splits = (splits,)
    for split in splits or ():
        if split not in known:
            raise ValueError(f"splits must be among {list(known)}, got {split!r}")
    data_root = resolve_data_root(root)
    spec = get_spec("multi30k")
    if splits is None:
        require_files(spec, data_root)
        splits = available_splits(data_root)
    else:
        for split in splits:
            files = multi30k_files((split,))
            missing = [name for name in files if not (data_root / name).is_file()]
            if missing:
                urls = [d.url for d in spec.downloads if d.target in files]
                raise MissingDataError("multi30k", data_root / "multi30k", missing, urls)
    result: dict[str, TranslationPairs] = {}
    for split in splits:
        de_path = data_root / "multi30k" / f"{split}.de.gz"
        en_path = data_root / "multi30k" / f"{split}.en.gz"
        de, en = read_gzip_lines(de_path), read_gzip_lines(en_path)
        if len(de) != len(en):
            shorter = de_path if len(de) < len(en) else en_path
            raise DatasetError(
                f"misaligned split {split!r}: {de_path.name} has {len(de)} lines but "
                f"{en_path.name} has {len(en)}; the shorter file is probably truncated",
                path=shorter, line=min(len(de), len(en)) + 1)
        result[split] = TranslationPairs(split, de, en)
    return result
