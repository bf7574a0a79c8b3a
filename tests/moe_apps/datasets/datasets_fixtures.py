"""Writers of tiny datasets in each official format, for the data-layer tests (no network).

Imported by conftest.py (fixtures) and by the tests that edit a fixture to break it.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

# --- MovieLens 100K: users 1, 2, 5; items 1, 2, 3, 7 (ids not contiguous on purpose) ----------
ML100K_OCCUPATIONS = ["administrator", "artist", "doctor"]
ML100K_GENRES = "unknown|0\nAction|1\nComedy|2\n\n"
ML100K_USERS = ["1|24|M|artist|85711", "2|53|F|doctor|94043", "5|33|F|administrator|15213"]
ML100K_ITEMS = [
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1",
    "2|Café au lait (1994)|||http://x|0|1|1",  # no release date: year from the title; Latin-1
    "3|unknown||||1|0|0",  # no date, no year in the title: year 0
    "7|Heat (1995)|15-Dec-1995||http://x|0|1|0",
]
# user, item, rating, timestamp
ML100K_RATINGS = [
    (1, 1, 5, 881250949), (1, 2, 3, 881250950), (2, 1, 4, 881250951), (2, 7, 1, 881250952),
    (5, 3, 2, 881250953), (5, 7, 4, 881250954), (1, 7, 2, 881250955), (2, 3, 5, 881250956),
]
ML100K_FOLD_TESTS = {  # rows of u.data in each official test file (the base file is the rest)
    "u1": [0, 5], "u2": [1, 6], "u3": [2, 7], "u4": [3], "u5": [4], "ua": [0, 2, 4], "ub": [1, 3, 5],
}


def rating_lines(rows: list[tuple[int, int, int, int]], sep: str = "\t") -> str:
    return "".join(sep.join(str(v) for v in row) + "\n" for row in rows)


def write_ml100k(root: Path) -> Path:
    """Write a valid tiny ml-100k folder under `root` and return that folder."""
    folder = root / "movielens" / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "u.occupation").write_text("\n".join(ML100K_OCCUPATIONS) + "\n")
    (folder / "u.genre").write_text(ML100K_GENRES)
    (folder / "u.user").write_text("\n".join(ML100K_USERS) + "\n")
    (folder / "u.item").write_bytes(("\n".join(ML100K_ITEMS) + "\n").encode("latin-1"))
    (folder / "u.data").write_text(rating_lines(ML100K_RATINGS))
    (folder / "u.info").write_text(f"3 users\n4 items\n{len(ML100K_RATINGS)} ratings\n")
    for fold, test_rows in ML100K_FOLD_TESTS.items():
        test = [ML100K_RATINGS[i] for i in test_rows]
        base = [r for i, r in enumerate(ML100K_RATINGS) if i not in test_rows]
        (folder / f"{fold}.base").write_text(rating_lines(base))
        (folder / f"{fold}.test").write_text(rating_lines(test))
    return folder


# --- MovieLens 1M: users 10, 3; movies 5, 1, 9 -----------------------------------------------
ML1M_USERS = ["10::F::1::10::48067", "3::M::56::16::70072"]
ML1M_MOVIES = [
    "5::Father of the Bride Part II (1995)::Comedy",
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "9::Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001)::Comedy|Romance",
]
ML1M_RATINGS = [(10, 1, 5, 978300760), (3, 9, 3, 978302109), (10, 5, 4, 978301968)]


def write_ml1m(root: Path) -> Path:
    folder = root / "movielens" / "ml-1m"
    folder.mkdir(parents=True)
    (folder / "users.dat").write_bytes(("\n".join(ML1M_USERS) + "\n").encode("latin-1"))
    (folder / "movies.dat").write_bytes(("\n".join(ML1M_MOVIES) + "\n").encode("latin-1"))
    (folder / "ratings.dat").write_text(rating_lines(ML1M_RATINGS, "::"))
    return folder


# --- CIFAR-10: batches of 2 images, pickled with Python-2 style str keys --------------------
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]
CIFAR_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch"]


def cifar_batch(index: int, labels: list[int] | None = None) -> dict:
    """Batch `index` (0..5): two images whose pixels are index*16 + image + channel offsets."""
    data = np.zeros((2, 3072), dtype=np.uint8)
    for image in range(2):
        for channel in range(3):
            data[image, channel * 1024:(channel + 1) * 1024] = index * 16 + image * 4 + channel
    return {"batch_label": f"batch {index}", "labels": labels or [index, (index + 3) % 10],
            "data": data, "filenames": [f"{index}_{i}.png" for i in range(2)]}


def cifar_members(overrides: dict[str, object] | None = None) -> dict[str, bytes]:
    """Pickled member bytes by member name; `overrides` replaces the object of a member."""
    objects: dict[str, object] = {
        "batches.meta": {"label_names": CIFAR_CLASSES, "num_cases_per_batch": 2, "num_vis": 3072},
    }
    for i, name in enumerate(CIFAR_BATCHES):
        objects[name] = cifar_batch(i)
    objects.update(overrides or {})
    return {name: pickle.dumps(obj, protocol=2) for name, obj in objects.items()}


def write_cifar_tar(root: Path, members: dict[str, bytes] | None = None) -> Path:
    path = root / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (members or cifar_members()).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


# --- Multi30k: three aligned lines per split ------------------------------------------------
def multi30k_lines(split: str, lang: str) -> list[str]:
    word = {"de": "Hund", "en": "dog"}[lang]
    return [f"{split} {word} {i} ä" if lang == "de" else f"{split} {word} {i}" for i in range(3)]


def write_multi30k(root: Path, splits: tuple[str, ...] = ("train", "val", "test_2016_flickr")) -> Path:
    folder = root / "multi30k"
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for lang in ("de", "en"):
            text = "\n".join(multi30k_lines(split, lang)) + "\n"
            (folder / f"{split}.{lang}.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    return folder
