"""The dataset registry: `DATASETS`, one `DatasetSpec` per dataset the apps use.

Each spec says where the files live under the data root, where to download them (the official
sources), which checksums are known and what exactly they are checksums *of*, the expected sizes,
the license / terms of use and the citation.

Checksums, honestly:
- MovieLens 100K: sha256 of the unzipped data files, as found in byte-identical copies of the
  official `ml-100k/` folder (shared/data/MANIFEST.md). The official zip's own checksum is not
  recorded here; a downloaded zip is checked through the files it unpacks to, plus counts.
- MovieLens 1M: no checksum is recorded; structure and counts are checked.
- CIFAR-10: md5 of the official python-version tarball (`c58f3010...`), checked on a download
  only. A re-packed copy (such as the project's shared one) has other bytes, so files already in
  place are checked by structure and counts, and the md5 is only reported.
- Multi30k: sha256 of the raw gzipped files at commit a3d2e0d of github.com/multi30k/dataset
  (the download URLs are pinned to that commit). The held-out test_2017 files have no recorded
  checksum; they are checked by gzip integrity, line counts and en/de alignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Download:
    """One file to fetch: `url` -> `target` (relative to the data root).

    `sha256` / `md5` are checksums of the downloaded bytes when known (None otherwise).
    `extract_to` is set for zips: the archive is unpacked and its folder `extract_member` becomes
    `extract_to` (relative to the data root); the zip itself is not kept.
    `optional`: a missing file on the server (HTTP 404) is skipped instead of failing.
    """

    url: str
    target: str
    sha256: str | None = None
    md5: str | None = None
    extract_to: str | None = None
    extract_member: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """Everything known about one dataset (see the module docstring for what checksums cover).

    `file_sets`: alternative complete layouts (paths relative to the data root); the dataset is
    complete when every file of one set exists. `optional_files` are used when present.
    `sha256`: known checksums of files in place (relative path -> hex digest).
    `counts`: expected sizes, checked by `verify_dataset` (name -> number).
    """

    name: str
    title: str
    homepage: str
    file_sets: tuple[tuple[str, ...], ...]
    downloads: tuple[Download, ...]
    license: str
    citation: str
    checksum_note: str
    optional_files: tuple[str, ...] = ()
    sha256: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """The top folder of the dataset under the data root (e.g. `movielens/ml-100k`)."""
        first = self.file_sets[0][0]
        return first.rsplit("/", 1)[0]


_ML100K = "movielens/ml-100k"
_ML100K_SHA256 = {
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
    "u.info": "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.occupation": "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
    "u1.base": "ce253ec86c448b44fb3ba9a30d12dcfc2e9210cbde71efada3730c22e9ac212a",
    "u1.test": "18c6014a4b2c7324f250a63f8904a7b16b2b19f911129e346141507b0cbac950",
    "u2.base": "6c06f0b5df4b256da1a994f3ac66edc8da4d3f09bc9282df6b14d893366d703e",
    "u2.test": "4de658d1e04ed9104629509a2e2528fce833ac8e048280183f1df167632038c3",
    "u3.base": "afdc155c291c6edc41c0407e39d7462eb98d341e064f0b0a12175b80b3c4af5d",
    "u3.test": "0f548b51c78327de4c156461d3e430b7e5579fe2b5681586a59416e48fd35f6d",
    "u4.base": "219f0f4d40dfe9c5141d425f53fa91ee23ed275f14e280bbf1b50117afb064ca",
    "u4.test": "7c02ad0a1e7ab1083c8b9d4b627203a051dd7b5eab46d99fa44de33470de8db9",
    "u5.base": "a9574e59ce961eec2121627760b6e9b0974ce1637b3fe69ac32cb14a4bfab485",
    "u5.test": "351cc52e0d15b6c721466276fc24671d40936899e3d01fadeaf312915b8c5634",
    "ua.base": "67b5bcdb380c29f85d56a012ecd88612ae020f30a6730d117a334ee8203b91f2",
    "ua.test": "d0497e202417720f57a184ec8c66be2d1afa4ff41bb53787c57b28d6bf79bc42",
    "ub.base": "237254d253b6ad7de84f919d041055428646254f34ed8f562703c899430cd881",
    "ub.test": "d54a72d05730d5892062734b2bec73e976f9b713d18c828a18b968d6cce442da",
}
ML100K_FOLDS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
ML100K_FILES = ("u.data", "u.info", "u.item", "u.genre", "u.user", "u.occupation") + tuple(
    f"{fold}.{part}" for fold in ML100K_FOLDS for part in ("base", "test")
)
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")


def _grouplens_zip(name: str) -> Download:
    """The official zip `name`.zip; its folder `name` becomes `movielens/<name>`."""
    return Download(
        url=f"https://files.grouplens.org/datasets/movielens/{name}.zip",
        target=f"movielens/{name}.zip",
        extract_to=f"movielens/{name}",
        extract_member=name,
    )


_MOVIELENS_TERMS = (
    "GroupLens terms (README in the zip): research use only; do not imply endorsement by the "
    "University of Minnesota or GroupLens; acknowledge the dataset in publications; no commercial "
    "use without permission; do not redistribute without separate permission."
)
_MOVIELENS_CITATION = (
    "F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
    "ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, Article 19. "
    "DOI: 10.1145/2827872"
)

CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_MEMBERS = ("batches.meta",) + CIFAR10_BATCHES + ("test_batch",)
CIFAR10_TARBALL = "cifar10/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar10/cifar-10-batches-py"
CIFAR10_OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"

MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
MULTI30K_BASE_URL = (
    f"https://raw.githubusercontent.com/multi30k/dataset/{MULTI30K_COMMIT}/data/task1/raw"
)
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_OPTIONAL_SPLITS = ("test_2017_flickr", "test_2017_mscoco")
MULTI30K_LANGS = ("de", "en")
_MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
}


def multi30k_files(splits: tuple[str, ...]) -> tuple[str, ...]:
    """The files of `splits` relative to the data root: `multi30k/<split>.<lang>.gz`."""
    return tuple(f"multi30k/{split}.{lang}.gz" for split in splits for lang in MULTI30K_LANGS)


def _multi30k_downloads() -> tuple[Download, ...]:
    downloads = []
    for split in MULTI30K_SPLITS + MULTI30K_OPTIONAL_SPLITS:
        for lang in MULTI30K_LANGS:
            name = f"{split}.{lang}.gz"
            downloads.append(
                Download(
                    url=f"{MULTI30K_BASE_URL}/{name}",
                    target=f"multi30k/{name}",
                    sha256=_MULTI30K_SHA256.get(name),
                    optional=split in MULTI30K_OPTIONAL_SPLITS,
                )
            )
    return tuple(downloads)


DATASETS: dict[str, DatasetSpec] = {
    "movielens-100k": DatasetSpec(
        name="movielens-100k",
        title="MovieLens 100K (943 users, 1,682 movies, 100,000 ratings 1-5, 1997-98)",
        homepage="https://grouplens.org/datasets/movielens/100k/",
        file_sets=(tuple(f"{_ML100K}/{name}" for name in ML100K_FILES),),
        downloads=(_grouplens_zip("ml-100k"),),
        license=_MOVIELENS_TERMS,
        citation=_MOVIELENS_CITATION,
        checksum_note=(
            "sha256 of the unzipped data files (copies of the official ml-100k/ folder, "
            "shared/data/MANIFEST.md); the official zip's checksum is not recorded."
        ),
        optional_files=(f"{_ML100K}/README",),
        sha256={f"{_ML100K}/{name}": digest for name, digest in _ML100K_SHA256.items()},
        counts={
            "ratings": 100_000, "users": 943, "items": 1_682,
            **{f"u{k} train": 80_000 for k in range(1, 6)},
            **{f"u{k} test": 20_000 for k in range(1, 6)},
            "ua train": 90_570, "ua test": 9_430, "ub train": 90_570, "ub test": 9_430,
        },
    ),
    "movielens-1m": DatasetSpec(
        name="movielens-1m",
        title="MovieLens 1M (6,040 users, 3,883 movies, 1,000,209 ratings 1-5, 2000-03)",
        homepage="https://grouplens.org/datasets/movielens/1m/",
        file_sets=(tuple(f"movielens/ml-1m/{name}" for name in ML1M_FILES),),
        downloads=(_grouplens_zip("ml-1m"),),
        license=_MOVIELENS_TERMS,
        citation=_MOVIELENS_CITATION,
        checksum_note="no checksum recorded; checked by structure and counts.",
        optional_files=("movielens/ml-1m/README",),
        counts={"ratings": 1_000_209, "users": 6_040, "items": 3_883},
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        title="CIFAR-10, python version (60,000 32x32 colour images in 10 classes)",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        file_sets=(
            (CIFAR10_TARBALL,),
            tuple(f"{CIFAR10_FOLDER}/{member}" for member in CIFAR10_MEMBERS),
        ),
        downloads=(
            Download(
                url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                target=CIFAR10_TARBALL,
                md5=CIFAR10_OFFICIAL_MD5,
            ),
        ),
        license=(
            "No formal license; free for research use; the authors ask that you cite the "
            "technical report. Images come from the 80 Million Tiny Images collection."
        ),
        citation=(
            "Alex Krizhevsky. Learning Multiple Layers of Features from Tiny Images. "
            "Technical report, University of Toronto, 2009."
        ),
        checksum_note=(
            f"md5 {CIFAR10_OFFICIAL_MD5} of the official tarball, checked on download; files in "
            "place are checked by structure and counts (re-packed copies have other bytes)."
        ),
        counts={"train": 50_000, "test": 10_000, "train_per_class": 5_000, "test_per_class": 1_000},
    ),
    "multi30k": DatasetSpec(
        name="multi30k",
        title="Multi30k task 1, English-German image descriptions (WMT16/17 multimodal)",
        homepage="https://github.com/multi30k/dataset",
        file_sets=(multi30k_files(MULTI30K_SPLITS),),
        downloads=_multi30k_downloads(),
        license=(
            "For non-commercial research and/or educational purposes; partly derived from "
            "Flickr30K, so use of the images must follow the Flickr Terms of Use."
        ),
        citation=(
            "Desmond Elliott, Stella Frank, Khalil Sima'an and Lucia Specia. 2016. Multi30K: "
            "Multilingual English-German Image Descriptions. In Proceedings of the 5th Workshop "
            "on Vision and Language, pages 70-74. DOI: 10.18653/v1/W16-3210"
        ),
        checksum_note=(
            f"sha256 of the raw .gz files at multi30k/dataset commit {MULTI30K_COMMIT[:7]} "
            "(train, val, test_2016_flickr); test_2017 files: none recorded."
        ),
        optional_files=multi30k_files(MULTI30K_OPTIONAL_SPLITS),
        sha256={f"multi30k/{name}": digest for name, digest in _MULTI30K_SHA256.items()},
        counts={
            "train": 29_000,
            "val": 1_014,
            "test_2016_flickr": 1_000,
            "test_2017_flickr": 1_000,
            "test_2017_mscoco": 461,
        },
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset `name`; a ValueError lists the known names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]
