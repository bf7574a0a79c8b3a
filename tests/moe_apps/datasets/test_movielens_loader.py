"""MovieLens loaders on tiny fixtures in the official formats: values, dense ids, folds, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import (
    ML1M_RATINGS,
    ML100K_FOLD_TESTS,
    ML100K_RATINGS,
    rating_lines,
    write_ml1m,
    write_ml100k,
)

from moe_apps.datasets import (
    DatasetError,
    MissingDataError,
    MovieLensData,
    Ratings,
    load_movielens,
)


def test_ml100k_values_and_dense_indices(ml100k_root: Path) -> None:
    data = load_movielens("movielens-100k", ml100k_root)
    assert isinstance(data, MovieLensData) and data.name == "movielens-100k"
    # users 1, 2, 5 -> 0, 1, 2; items 1, 2, 3, 7 -> 0, 1, 2, 3 (hand-computed)
    user_index = {1: 0, 2: 1, 5: 2}
    item_index = {1: 0, 2: 1, 3: 2, 7: 3}
    r = data.ratings
    assert len(r) == 8
    assert r.user.tolist() == [user_index[u] for u, _, _, _ in ML100K_RATINGS]
    assert r.item.tolist() == [item_index[i] for _, i, _, _ in ML100K_RATINGS]
    assert r.rating.tolist() == [float(x) for _, _, x, _ in ML100K_RATINGS]
    assert r.timestamp.tolist() == [t for _, _, _, t in ML100K_RATINGS]
    assert (r.user.dtype, r.item.dtype, r.rating.dtype, r.timestamp.dtype) == (
        np.int64, np.int64, np.float32, np.int64)

    u = data.users
    assert len(u) == 3
    assert u.raw_id.tolist() == [1, 2, 5]
    assert u.gender.tolist() == [1, 0, 0]
    assert u.age.tolist() == [24, 53, 33]
    assert u.occupation_names == ["administrator", "artist", "doctor"]
    assert u.occupation.tolist() == [1, 2, 0]
    assert u.zip_code == ["85711", "94043", "15213"]

    it = data.items
    assert len(it) == 4
    assert it.raw_id.tolist() == [1, 2, 3, 7]
    assert it.title == ["Toy Story (1995)", "Café au lait (1994)", "unknown", "Heat (1995)"]
    assert it.year.tolist() == [1995, 1994, 0, 1995]
    assert it.genre_names == ["unknown", "Action", "Comedy"]
    assert it.genres.dtype == bool
    assert it.genres.astype(int).tolist() == [[0, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0]]


def test_ml100k_folds_are_the_official_files(ml100k_root: Path) -> None:
    data = load_movielens("movielens-100k", ml100k_root)
    assert sorted(data.folds) == sorted(ML100K_FOLD_TESTS)
    for fold, test_rows in ML100K_FOLD_TESTS.items():
        train, test = data.folds[fold]
        base_rows = [i for i in range(len(ML100K_RATINGS)) if i not in test_rows]
        for part, rows in ((train, base_rows), (test, test_rows)):
            expected = data.ratings.subset(np.array(rows, dtype=np.int64))
            for field in ("user", "item", "rating", "timestamp"):
                np.testing.assert_array_equal(getattr(part, field), getattr(expected, field))


def test_ratings_subset_and_length_check() -> None:
    r = Ratings(np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([1.0, 2.0, 3.0], np.float32),
                np.array([7, 8, 9]))
    s = r.subset(np.array([2, 0]))
    assert (s.user.tolist(), s.item.tolist(), s.rating.tolist(), s.timestamp.tolist()) == (
        [2, 0], [5, 3], [3.0, 1.0], [9, 7])
    assert len(r.subset(np.array([True, False, True]))) == 2
    with pytest.raises(ValueError, match="Ratings.item has 2 rows"):
        Ratings(np.array([0, 1, 2]), np.array([3, 4]), np.ones(3, np.float32), np.zeros(3))


def test_ml1m_values(ml1m_root: Path) -> None:
    data = load_movielens("movielens-1m", ml1m_root)
    assert data.name == "movielens-1m" and data.folds == {}
    assert data.users.raw_id.tolist() == [3, 10]
    assert data.users.gender.tolist() == [1, 0]
    assert data.users.age.tolist() == [56, 1]
    assert data.users.occupation.tolist() == [16, 10]
    assert data.users.occupation_names[16] == "self-employed"
    assert data.users.zip_code == ["70072", "48067"]
    assert data.items.raw_id.tolist() == [1, 5, 9]
    assert data.items.title[2].startswith("Amélie")
    assert data.items.year.tolist() == [1995, 1995, 2001]
    names = data.items.genre_names
    assert len(names) == 18
    on = [sorted(names[g] for g in np.flatnonzero(row)) for row in data.items.genres]
    assert on == [["Animation", "Children's", "Comedy"], ["Comedy"], ["Comedy", "Romance"]]
    users = {3: 0, 10: 1}
    items = {1: 0, 5: 1, 9: 2}
    assert data.ratings.user.tolist() == [users[u] for u, _, _, _ in ML1M_RATINGS]
    assert data.ratings.item.tolist() == [items[i] for _, i, _, _ in ML1M_RATINGS]
    assert data.ratings.rating.tolist() == [5.0, 3.0, 4.0]


def test_unknown_name_is_a_clear_value_error(ml100k_root: Path) -> None:
    with pytest.raises(ValueError, match="'movielens-100k' or 'movielens-1m', got 'cifar10'"):
        load_movielens("cifar10", ml100k_root)


def test_missing_folder_names_dataset_url_and_folder(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as info:
        load_movielens("movielens-100k", tmp_path)
    message = str(info.value)
    assert "movielens-100k" in message
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message
    assert str(tmp_path / "movielens" / "ml-100k") in message


def test_missing_one_file(ml100k_root: Path) -> None:
    (ml100k_root / "movielens/ml-100k/u3.test").unlink()
    with pytest.raises(MissingDataError, match="u3.test"):
        load_movielens("movielens-100k", ml100k_root)


def test_root_from_environment(ml100k_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_APPS_DATA", str(ml100k_root))
    assert len(load_movielens().ratings) == 8


def _edit(path: Path, line: int, new: str | None) -> None:
    """Replace (or with None, delete) 1-based `line` of a Latin-1 text file."""
    lines = path.read_bytes().decode("latin-1").split("\n")
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    path.write_bytes("\n".join(lines).encode("latin-1"))


BAD_100K = [
    ("u.data", 2, "1\t2\t3", r"u\.data, line 2: expected 4 fields"),
    ("u.data", 3, "2\t1\tfour\t881250951", r"u\.data, line 3: rating must be an integer"),
    # an empty field next to one with a space inside must not shift the columns
    ("u.data", 2, "1 2\t\t3\t881250950", r"u\.data, line 2: user id must be an integer .*'1 2'"),
    ("u.data", 7, "1\t7\t2\t99999999999999999999",
     r"u\.data, line 7: timestamp must be an integer \(64-bit\)"),
    ("u.data", 4, "2\t7\t6\t881250952", r"u\.data, line 4: rating must be 1\.\.5, got 6"),
    ("u.data", 1, "1\t1\t0\t881250949", r"u\.data, line 1: rating must be 1\.\.5, got 0"),
    ("u.data", 5, "4\t3\t2\t881250953", r"u\.data, line 5: unknown user id 4"),
    ("u.data", 6, "5\t8\t4\t881250954", r"u\.data, line 6: unknown item id 8"),
    ("u.data", 8, None, r"u\.info: says 8 ratings but u\.data has 7"),
    ("u.user", 2, "2|53|X|doctor|94043", r"u\.user, line 2: gender must be 'F' or 'M'"),
    ("u.user", 3, "5|33|F|astronaut|15213", r"u\.user, line 3: occupation 'astronaut'"),
    ("u.user", 3, "2|33|F|artist|15213", r"u\.user, line 3: user id 2 appears twice"),
    ("u.user", 1, "1|24|M|artist", r"u\.user, line 1: expected 5 fields"),
    ("u.item", 2, "2|Two|||x|0|2|1", r"u\.item, line 2: genre flags must be 0 or 1"),
    ("u.item", 3, "3|unknown||||1|0", r"u\.item, line 3: expected 8 fields"),
    ("u.item", 4, "x|Heat (1995)|15-Dec-1995||x|0|1|0", r"u\.item, line 4: movie id must be"),
    ("u.genre", 2, "Action", r"u\.genre, line 2: expected 'name\|index'"),
    ("u.info", 1, "4 users", r"u\.info: says 4 users but u\.user has 3 lines"),
    ("u1.test", 1, "1\t1\t5\t881250949\n1\t2\t3\t881250950",
     r"u1\.test: .*u1\.base \(6 rows\) \+ u1\.test \(3 rows\)"),
    ("u4.base", 1, "2\t7\t1\t881250952",
     r"u4\.test: 1 \(user, item\) pairs are in both u4\.base and u4\.test"),
]
BAD_1M = [
    ("ratings.dat", 2, "3::9::3", r"ratings\.dat, line 2: expected 4 fields"),
    ("ratings.dat", 3, "10::5::7::978301968", r"ratings\.dat, line 3: rating must be 1\.\.5"),
    ("ratings.dat", 3, "10 5::::4::978301968", r"ratings\.dat, line 3: user id must be an integer"),
    ("ratings.dat", 1, "11::1::5::978300760", r"ratings\.dat, line 1: unknown user id 11"),
    ("users.dat", 1, "10::F::2::10::48067", r"users\.dat, line 1: age group must be one of"),
    ("users.dat", 2, "3::M::56::21::70072", r"users\.dat, line 2: occupation must be 0\.\.20"),
    ("users.dat", 2, "3::?::56::16::70072", r"users\.dat, line 2: gender must be"),
    ("movies.dat", 1, "5::Father (1995)::Comedy|Satire", r"movies\.dat, line 1: unknown genre"),
    ("movies.dat", 2, "1 Toy Story (1995) Comedy", r"movies\.dat, line 2: expected 'MovieID"),
]
BAD = [("movielens-100k", *row) for row in BAD_100K] + [("movielens-1m", *row) for row in BAD_1M]
WRITERS = {"movielens-100k": write_ml100k, "movielens-1m": write_ml1m}


@pytest.mark.parametrize("dataset, name, line, new, pattern", BAD,
                         ids=[f"{b[0][10:]}-{b[4][:40]}" for b in BAD])
def test_bad_files(tmp_path: Path, dataset: str, name: str, line: int, new: str | None,
                   pattern: str) -> None:
    folder = WRITERS[dataset](tmp_path)
    _edit(folder / name, line, new)
    with pytest.raises(DatasetError, match=pattern) as info:
        load_movielens(dataset, tmp_path)
    blamed = pattern.split(":")[0].replace("\\", "").split(",")[0]  # the file the message names
    assert info.value.path == folder / blamed


def test_error_carries_the_line_number(ml100k_root: Path) -> None:
    _edit(ml100k_root / "movielens/ml-100k/u.data", 5, "1\t1\t9\t0")
    with pytest.raises(ValueError) as info:  # a DatasetError is a ValueError
        load_movielens("movielens-100k", ml100k_root)
    assert isinstance(info.value, DatasetError) and info.value.line == 5


def test_fold_with_an_unknown_item(ml100k_root: Path) -> None:
    folder = ml100k_root / "movielens/ml-100k"
    (folder / "ub.test").write_text(rating_lines([(1, 99, 3, 0)]) + (folder / "ub.test").read_text())
    with pytest.raises(DatasetError, match=r"ub\.test, line 1: unknown item id 99"):
        load_movielens("movielens-100k", ml100k_root)


@pytest.mark.shared_data
def test_real_movielens_100k(shared_data: Path) -> None:
    data = load_movielens("movielens-100k", shared_data)
    assert (len(data.ratings), len(data.users), len(data.items)) == (100_000, 943, 1_682)
    assert data.users.raw_id.tolist() == list(range(1, 944))
    assert data.items.raw_id.tolist() == list(range(1, 1683))
    assert np.unique(data.ratings.user).size == 943 and np.unique(data.ratings.item).size == 1682
    assert set(np.unique(data.ratings.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert data.items.genres.shape == (1682, 19) and data.items.genre_names[0] == "unknown"
    assert len(data.users.occupation_names) == 21
    assert data.items.title[0] == "Toy Story (1995)" and data.items.year[0] == 1995
    # first line of u.data: "196 242 3 881250949" (hand-read from the file)
    assert (data.ratings.user[0], data.ratings.item[0], data.ratings.rating[0]) == (195, 241, 3.0)
    assert data.ratings.timestamp[0] == 881250949
    for fold in ("u1", "u2", "u3", "u4", "u5"):
        train, test = data.folds[fold]
        assert (len(train), len(test)) == (80_000, 20_000)
    for fold in ("ua", "ub"):  # exactly 10 test ratings per user
        train, test = data.folds[fold]
        assert len(test) == 9_430 and np.bincount(test.user).tolist() == [10] * 943
