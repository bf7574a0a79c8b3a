"""Multi30k loader: aligned (de, en) pairs from gzipped files, bad files, real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from datasets_fixtures import multi30k_lines, write_multi30k

from moe_apps.datasets import DatasetError, MissingDataError, TranslationPairs, load_multi30k


def test_loads_aligned_pairs(multi30k_root: Path) -> None:
    data = load_multi30k(multi30k_root)
    assert list(data) == ["train", "val", "test_2016_flickr"]
    for split, pairs in data.items():
        assert isinstance(pairs, TranslationPairs) and pairs.split == split
        assert len(pairs) == 3
        assert pairs.de == multi30k_lines(split, "de")  # UTF-8 "ä" survives
        assert pairs.en == multi30k_lines(split, "en")
        assert pairs.pairs() == list(zip(pairs.de, pairs.en, strict=True))
        assert list(pairs)[1] == (f"{split} Hund 1 ä", f"{split} dog 1")


def test_optional_test_2017_sets_when_present(tmp_path: Path) -> None:
    write_multi30k(tmp_path, ("train", "val", "test_2016_flickr", "test_2017_mscoco"))
    assert list(load_multi30k(tmp_path)) == ["train", "val", "test_2016_flickr", "test_2017_mscoco"]
    assert list(load_multi30k(tmp_path, splits=["test_2017_mscoco"])) == ["test_2017_mscoco"]
    with pytest.raises(MissingDataError, match="test_2017_flickr.de.gz"):
        load_multi30k(tmp_path, splits=["test_2017_flickr"])


def test_single_split_by_name(multi30k_root: Path) -> None:
    assert list(load_multi30k(multi30k_root, splits="val")) == ["val"]


def test_unknown_split(multi30k_root: Path) -> None:
    with pytest.raises(ValueError, match="splits must be among .* got 'test2016'"):
        load_multi30k(multi30k_root, splits=["test2016"])


def test_missing_files_name_url_and_folder(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as info:
        load_multi30k(tmp_path)
    message = str(info.value)
    assert "raw.githubusercontent.com/multi30k/dataset/" in message
    assert str(tmp_path / "multi30k") in message


def _write(path: Path, lines: list[str]) -> None:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))


def test_misaligned_files(multi30k_root: Path) -> None:
    _write(multi30k_root / "multi30k" / "val.en.gz", multi30k_lines("val", "en")[:2])
    with pytest.raises(DatasetError, match=r"val\.en\.gz, line 3: misaligned split 'val': "
                                           r"val\.de\.gz has 3 lines but val\.en\.gz has 2"):
        load_multi30k(multi30k_root)


def test_truncated_gzip(multi30k_root: Path) -> None:
    path = multi30k_root / "multi30k" / "train.de.gz"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(DatasetError, match=r"train\.de\.gz: truncated or corrupt gzip"):
        load_multi30k(multi30k_root)


def test_not_gzip(multi30k_root: Path) -> None:
    (multi30k_root / "multi30k" / "test_2016_flickr.en.gz").write_text("plain text\n")
    with pytest.raises(DatasetError, match=r"test_2016_flickr\.en\.gz: truncated or corrupt gzip"):
        load_multi30k(multi30k_root)


def test_empty_line_inside(multi30k_root: Path) -> None:
    _write(multi30k_root / "multi30k" / "train.en.gz", ["a", "", "c"])
    with pytest.raises(DatasetError, match=r"train\.en\.gz, line 2: empty sentence"):
        load_multi30k(multi30k_root)


def test_not_utf8(multi30k_root: Path) -> None:
    path = multi30k_root / "multi30k" / "val.de.gz"
    path.write_bytes(gzip.compress("eins\nzwei\ndrei Männer\n".encode("latin-1")))
    with pytest.raises(DatasetError, match=r"val\.de\.gz, line 3: not valid utf-8"):
        load_multi30k(multi30k_root)


def test_pairs_must_align() -> None:
    with pytest.raises(ValueError, match="2 German but 1 English"):
        TranslationPairs("x", ["a", "b"], ["a"])


@pytest.mark.shared_data
def test_real_multi30k(shared_data: Path) -> None:
    data = load_multi30k(shared_data)
    assert {split: len(pairs) for split, pairs in data.items()} == {
        "train": 29_000, "val": 1_014, "test_2016_flickr": 1_000}
    de, en = data["val"].pairs()[0]
    assert de == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"
    assert en == "A group of men are loading cotton onto a truck"
