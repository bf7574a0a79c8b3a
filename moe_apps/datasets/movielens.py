"""MovieLens 100K and 1M (Harper & Konstan 2015, DOI 10.1145/2827872): typed, checked loaders.

`load_movielens(name, root)` reads the official unzipped folders (`movielens/ml-100k/`,
`movielens/ml-1m/` under the data root) into frozen dataclasses of numpy arrays:
`Ratings` (one row per rating, dense user/item indices), `Users`, `Items` and, for 100K, the
official folds u1..u5, ua, ub as (train, test) `Ratings`.

Dense indices: users and items are numbered 0..n-1 in increasing MovieLens id over *all* users of
u.user / users.dat and all movies of u.item / movies.dat (so ML-1M has items nobody rated);
`Users.raw_id[u]` / `Items.raw_id[i]` give the MovieLens id back.

Every file is checked: field counts, integer fields, ratings in 1..5, ids known, genre flags 0/1,
the counts of u.info (100K) and that every fold's base + test is all of u.data with no
(user, item) pair in both. Anything else raises `DatasetError` naming the file and line.
u.item and the ML-1M .dat files are Latin-1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_apps.datasets.errors import DatasetError
from moe_apps.datasets.files import map_ids, parse_int_table, read_lines, require_files
from moe_apps.datasets.paths import resolve_data_root
from moe_apps.datasets.registry import ML100K_FOLDS, get_spec

_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
ML1M_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)
ML1M_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+


@dataclass(frozen=True)
class Ratings:
    """One row per rating: dense `user` / `item` (int64), `rating` (float32 1..5), `timestamp`."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.user)
        for field in ("item", "rating", "timestamp"):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"Ratings.{field} has {len(getattr(self, field))} rows, Ratings.user has {n}"
                )

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, idx: np.ndarray) -> Ratings:
        """The rows `idx` (integer indices or a boolean mask), as a new `Ratings`."""
        return Ratings(self.user[idx], self.item[idx], self.rating[idx], self.timestamp[idx])


@dataclass(frozen=True)
class Users:
    """Per dense user index: MovieLens id, gender (0 = F, 1 = M), age, occupation index, zip."""

    raw_id: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    occupation: np.ndarray
    zip_code: list[str]
    occupation_names: list[str]

    def __len__(self) -> int:
        return len(self.raw_id)


@dataclass(frozen=True)
class Items:
    """Per dense item index: MovieLens id, title, release year (0 = unknown), genres multi-hot."""

    raw_id: np.ndarray
    title: list[str]
    year: np.ndarray
    genres: np.ndarray
    genre_names: list[str]

    def __len__(self) -> int:
        return len(self.raw_id)


@dataclass(frozen=True)
class MovieLensData:
    """A whole MovieLens dataset: all ratings in file order, users, items and official folds."""

    name: str
    ratings: Ratings
    users: Users
    items: Items
    folds: dict[str, tuple[Ratings, Ratings]]


def load_movielens(name: str = "movielens-100k", root: str | Path | None = None) -> MovieLensData:
    """Load `movielens-100k` or `movielens-1m` from the data root (see `resolve_data_root`).

    Raises `MissingDataError` (with the folder to put the files in) when files are missing and
    `DatasetError` (with file and line) when a file is malformed.
    """
    if name not in ("movielens-100k", "movielens-1m"):
        raise ValueError(f"name must be 'movielens-100k' or 'movielens-1m', got {name!r}")
    spec = get_spec(name)
    data_root = resolve_data_root(root)
    require_files(spec, data_root)
    folder = data_root / spec.folder
    if name == "movielens-100k":
        return _load_100k(folder)
    return _load_1m(folder)


def read_ratings(path: Path, sep: str) -> np.ndarray:
    """(n, 4) int64 user id, item id, rating, timestamp; a rating outside 1..5 names its line."""
    table = parse_int_table(path, read_lines(path, "latin-1"), sep, 4,
                            ("user id", "item id", "rating", "timestamp")).ints
    bad = np.flatnonzero((table[:, 2] < 1) | (table[:, 2] > 5))
    if bad.size:
        raise DatasetError(f"rating must be 1..5, got {int(table[bad[0], 2])}", path=path,
                           line=int(bad[0]) + 1)
    return table


def _ratings_from_table(table: np.ndarray, path: Path, users: Users, items: Items) -> Ratings:
    user = map_ids(users.raw_id, table[:, 0], path, "user id")
    item = map_ids(items.raw_id, table[:, 1], path, "item id")
    return Ratings(user, item, table[:, 2].astype(np.float32), table[:, 3].copy())


def _load_100k(folder: Path) -> MovieLensData:
    occupation_names = read_lines(folder / "u.occupation", "latin-1")
    for number, occupation in enumerate(occupation_names, 1):
        if not occupation.strip() or "|" in occupation:
            raise DatasetError(f"bad occupation name {occupation!r}", path=folder / "u.occupation",
                               line=number)
    genre_names = _read_100k_genres(folder / "u.genre")
    users = _read_100k_users(folder / "u.user", occupation_names)
    items = _read_100k_items(folder / "u.item", genre_names)

    data_path = folder / "u.data"
    ratings = _ratings_from_table(read_ratings(data_path, "\t"), data_path, users, items)
    _check_info(folder / "u.info", len(users), len(items), len(ratings))

    folds: dict[str, tuple[Ratings, Ratings]] = {}
    for fold in ML100K_FOLDS:
        parts = []
        for part in ("base", "test"):
            path = folder / f"{fold}.{part}"
            parts.append(_ratings_from_table(read_ratings(path, "\t"), path, users, items))
        train, test = parts
        if len(train) + len(test) != len(ratings):
            raise DatasetError(
                f"{fold}.base ({len(train)} rows) + {fold}.test ({len(test)} rows) should be all "
                f"{len(ratings)} ratings of u.data",
                path=folder / f"{fold}.test",
            )
        keys_train = train.user * len(items) + train.item
        keys_test = test.user * len(items) + test.item
        overlap = np.intersect1d(keys_train, keys_test)
        if overlap.size:
            u, i = divmod(int(overlap[0]), len(items))
            raise DatasetError(
                f"{overlap.size} (user, item) pairs are in both {fold}.base and {fold}.test, e.g. "
                f"user {users.raw_id[u]} item {items.raw_id[i]}",
                path=folder / f"{fold}.test",
            )
        folds[fold] = (train, test)
    return MovieLensData("movielens-100k", ratings, users, items, folds)


def _read_100k_genres(path: Path) -> list[str]:
    names: dict[int, str] = {}
    for number, line in enumerate(read_lines(path, "latin-1"), 1):
        fields = line.split("|")
        if len(fields) != 2 or not fields[1].strip().isdigit() or not fields[0]:
            raise DatasetError(f"expected 'name|index', got {line!r}", path=path, line=number)
        names[int(fields[1])] = fields[0]
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"genre indices must be 0..{len(names) - 1}, got {sorted(names)}",
                           path=path)
    return [names[i] for i in range(len(names))]


def _read_100k_users(path: Path, occupation_names: list[str]) -> Users:
    rows = [line.split("|") for line in read_lines(path, "latin-1")]
    occupation_index = {name: i for i, name in enumerate(occupation_names)}
    raw_id, gender, age, occupation, zip_code = [], [], [], [], []
    for number, fields in enumerate(rows, 1):
        if len(fields) != 5:
            raise DatasetError(
                f"expected 5 fields 'user id|age|gender|occupation|zip code', got {len(fields)}",
                path=path, line=number)
        uid, years, sex, job, code = fields
        if not (uid.strip().isdigit() and years.strip().isdigit()):
            raise DatasetError(f"user id and age must be integers, got {uid!r}, {years!r}",
                               path=path, line=number)
        if sex not in ("F", "M"):
            raise DatasetError(f"gender must be 'F' or 'M', got {sex!r}", path=path, line=number)
        if job not in occupation_index:
            raise DatasetError(f"occupation {job!r} is not in u.occupation", path=path,
                               line=number)
        raw_id.append(int(uid))
        gender.append(int(sex == "M"))
        age.append(int(years))
        occupation.append(occupation_index[job])
        zip_code.append(code)
    ids = np.array(raw_id, dtype=np.int64)
    order = _sorted_unique_order(ids, path, "user id")
    return Users(
        raw_id=ids[order],
        gender=np.array(gender, dtype=np.int64)[order],
        age=np.array(age, dtype=np.int64)[order],
        occupation=np.array(occupation, dtype=np.int64)[order],
        zip_code=[zip_code[i] for i in order],
        occupation_names=list(occupation_names),
    )


def _read_100k_items(path: Path, genre_names: list[str]) -> Items:
    num_fields = 5 + len(genre_names)
    raw_id, title, year, genres = [], [], [], []
    for number, line in enumerate(read_lines(path, "latin-1"), 1):
        fields = line.split("|")
        if len(fields) != num_fields:
            raise DatasetError(
                f"expected {num_fields} fields (id|title|release date|video release date|url| "
                f"{len(genre_names)} genre flags), got {len(fields)}", path=path, line=number)
        if not fields[0].strip().isdigit():
            raise DatasetError(f"movie id must be an integer, got {fields[0]!r}", path=path,
                               line=number)
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DatasetError(f"genre flags must be 0 or 1, got {flags}", path=path, line=number)
        raw_id.append(int(fields[0]))
        title.append(fields[1])
        year.append(_release_year(fields[2], fields[1]))
        genres.append([flag == "1" for flag in flags])
    return _items_by_id(path, raw_id, title, year, genres, genre_names)


def _release_year(date: str, title: str) -> int:
    """Year of a release date like '01-Jan-1995', else the '(1995)' of the title, else 0."""
    tail = date.strip()[-4:]
    return int(tail) if tail.isdigit() else _title_year(title)


def _title_year(title: str) -> int:
    """The year of a title ending in '(1995)', else 0."""
    match = _YEAR_IN_TITLE.search(title)
    return int(match.group(1)) if match else 0


def _check_info(path: Path, num_users: int, num_items: int, num_ratings: int) -> None:
    found: dict[str, int] = {}
    for number, line in enumerate(read_lines(path, "latin-1"), 1):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetError(f"expected '<count> users|items|ratings', got {line!r}", path=path,
                               line=number)
        found[fields[1]] = int(fields[0])
    actual = {"users": (num_users, "u.user"), "items": (num_items, "u.item"),
              "ratings": (num_ratings, "u.data")}
    for key, (value, source) in actual.items():
        if found.get(key) != value:
            raise DatasetError(
                f"says {found.get(key)} {key} but {source} has {value} lines (truncated or "
                f"edited file?)", path=path)


def _sorted_unique_order(raw_id: np.ndarray, path: Path, what: str) -> np.ndarray:
    order = np.argsort(raw_id, kind="stable")
    sorted_ids = raw_id[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        value = int(sorted_ids[dup[0]])
        line = int(np.flatnonzero(raw_id == value)[1]) + 1
        raise DatasetError(f"{what} {value} appears twice", path=path, line=line)
    return order


def _items_by_id(path: Path, raw_id: list[int], title: list[str], year: list[int],
                 genres: list[list[bool]], genre_names: Sequence[str]) -> Items:
    """`Items` from per-line lists of a movies file, sorted by movie id (a repeated id names its
    line)."""
    ids = np.array(raw_id, dtype=np.int64)
    order = _sorted_unique_order(ids, path, "movie id")
    return Items(
        raw_id=ids[order],
        title=[title[i] for i in order],
        year=np.array(year, dtype=np.int64)[order],
        genres=np.array(genres, dtype=bool).reshape(len(raw_id), len(genre_names))[order],
        genre_names=list(genre_names),
    )


def _load_1m(folder: Path) -> MovieLensData:
    users_path = folder / "users.dat"
    table = parse_int_table(users_path, read_lines(users_path, "latin-1"), "::", 5,
                            ("UserID", "Gender", "Age", "Occupation", "Zip-code"),
                            text_columns=(1, 4))
    raw_id = table.ints[:, 0]
    for row, (sex, age, job) in enumerate(
        zip(table.text[1], table.ints[:, 2], table.ints[:, 3], strict=True)
    ):
        if sex not in ("F", "M"):
            raise DatasetError(f"gender must be 'F' or 'M', got {sex!r}", path=users_path,
                               line=row + 1)
        if int(age) not in ML1M_AGE_GROUPS:
            raise DatasetError(f"age group must be one of {ML1M_AGE_GROUPS}, got {age}",
                               path=users_path, line=row + 1)
        if not 0 <= int(job) < len(ML1M_OCCUPATIONS):
            raise DatasetError(f"occupation must be 0..{len(ML1M_OCCUPATIONS) - 1}, got {job}",
                               path=users_path, line=row + 1)
    order = _sorted_unique_order(raw_id, users_path, "user id")
    users = Users(
        raw_id=raw_id[order],
        gender=np.array([int(s == "M") for s in table.text[1]], dtype=np.int64)[order],
        age=table.ints[order, 2],
        occupation=table.ints[order, 3],
        zip_code=[table.text[4][i] for i in order],
        occupation_names=list(ML1M_OCCUPATIONS),
    )
    items = _read_1m_movies(folder / "movies.dat")
    ratings_path = folder / "ratings.dat"
    ratings = _ratings_from_table(read_ratings(ratings_path, "::"), ratings_path, users, items)
    return MovieLensData("movielens-1m", ratings, users, items, {})


def _read_1m_movies(path: Path) -> Items:
    genre_index = {name: i for i, name in enumerate(ML1M_GENRES)}
    raw_id, title, year, genres = [], [], [], []
    for number, line in enumerate(read_lines(path, "latin-1"), 1):
        head, sep, rest = line.partition("::")
        name, sep2, genre_field = rest.rpartition("::")
        if not (sep and sep2 and head.strip().isdigit() and name):
            raise DatasetError(f"expected 'MovieID::Title::Genres', got {line!r}", path=path,
                               line=number)
        flags = [False] * len(ML1M_GENRES)
        for genre in genre_field.split("|"):
            if genre not in genre_index:
                raise DatasetError(f"unknown genre {genre!r}; known: {', '.join(ML1M_GENRES)}",
                                   path=path, line=number)
            flags[genre_index[genre]] = True
        raw_id.append(int(head))
        title.append(name)
        year.append(_title_year(name))
        genres.append(flags)
    return _items_by_id(path, raw_id, title, year, genres, ML1M_GENRES)
