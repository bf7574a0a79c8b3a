"""Synthetic MovieLens data for the recsys tests: a hand-made 3-user dataset in memory, and a
random small ML-100K folder on disk (every official file) for the CLI smoke tests. No network."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_apps.datasets import Items, MovieLensData, Ratings, Users

OFFICIAL = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


def hand_data() -> MovieLensData:
    """3 users, 4 movies, 7 ratings; fold u1 tests ratings 5 and 6.

    users: raw ids 10, 20, 30; gender M, F, M; ages 17, 30, 60; zip 55455, 94043, T8H1N.
    movies: raw ids 1..4; years 1995, 0 (unknown), 1950, 1921; genres {0,2}, {1}, {}, {0,1,2}.
    """
    ratings = Ratings(
        user=np.array([0, 0, 1, 1, 2, 2, 0]),
        item=np.array([0, 1, 0, 3, 2, 3, 3]),
        rating=np.array([5, 3, 4, 1, 2, 4, 2], dtype=np.float32),
        timestamp=np.array([10, 20, 30, 40, 50, 60, 70]),
    )
    users = Users(raw_id=np.array([10, 20, 30]), gender=np.array([1, 0, 1]),
                  age=np.array([17, 30, 60]), occupation=np.array([2, 0, 1]),
                  zip_code=["55455", "94043", "T8H1N"],
                  occupation_names=["artist", "doctor", "writer"])
    genres = np.zeros((4, 3), dtype=bool)
    genres[0, [0, 2]] = True
    genres[1, 1] = True
    genres[3, :] = True
    items = Items(raw_id=np.array([1, 2, 3, 4]), title=["A (1995)", "B", "C (1950)", "D (1921)"],
                  year=np.array([1995, 0, 1950, 1921]), genres=genres,
                  genre_names=["Action", "Comedy", "Drama"])
    test = np.array([5, 6])
    train = np.setdiff1d(np.arange(7), test)
    return MovieLensData("movielens-100k", ratings, users, items,
                         {"u1": (ratings.subset(train), ratings.subset(test))})


def write_random_ml100k(root: Path, num_users: int = 30, num_items: int = 40,
                        num_ratings: int = 400, seed: int = 0) -> Path:
    """A random but learnable ML-100K folder under ``root`` (ratings follow user + item biases)."""
    rng = np.random.default_rng(seed)
    folder = root / "movielens" / "ml-100k"
    folder.mkdir(parents=True)
    occupations = ["artist", "doctor", "engineer", "writer"]
    (folder / "u.occupation").write_text("\n".join(occupations) + "\n")
    (folder / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\nDrama|3\n\n")
    users = [f"{u + 1}|{rng.integers(15, 70)}|{'MF'[u % 2]}|{occupations[u % 4]}|{10000 + 997 * u}"
             for u in range(num_users)]
    (folder / "u.user").write_text("\n".join(users) + "\n")
    items = []
    for i in range(num_items):
        flags = "|".join(str(int(f)) for f in rng.random(4) < 0.4)
        items.append(f"{i + 1}|Movie {i + 1} ({1950 + i})|01-Jan-{1950 + i}||http://x|{flags}")
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    pairs = rng.choice(num_users * num_items, size=num_ratings, replace=False)
    user, item = pairs // num_items, pairs % num_items
    score = 3 + rng.normal(0, 1, num_users)[user] + rng.normal(0, 1, num_items)[item]
    rating = np.clip(np.round(score + rng.normal(0, 0.5, num_ratings)), 1, 5).astype(int)
    rows = [(int(u) + 1, int(i) + 1, int(r), 880000000 + k) for k, (u, i, r) in
            enumerate(zip(user, item, rating, strict=True))]
    lines = lambda part: "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in part)  # noqa: E731
    (folder / "u.data").write_text(lines(rows))
    (folder / "u.info").write_text(f"{num_users} users\n{num_items} items\n{num_ratings} ratings\n")
    for k, fold in enumerate(OFFICIAL):
        test = set(range(k % 5, num_ratings, 5))
        (folder / f"{fold}.base").write_text(lines([r for j, r in enumerate(rows) if j not in test]))
        (folder / f"{fold}.test").write_text(lines([r for j, r in enumerate(rows) if j in test]))
    return folder
