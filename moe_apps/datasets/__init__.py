"""The data layer: dataset registry, data folder, checked downloads and typed loaders.

`DATASETS` (registry.py) says what each dataset is and where it comes from;
`resolve_data_root` (paths.py) where it is looked for; `download_dataset` (download.py) fetches it
safely; `load_movielens`, `load_cifar10`, `load_multi30k` read it into frozen dataclasses;
`dataset_status` / `verify_dataset` say whether it is there and valid. Bad files raise
`DatasetError` (a ValueError) with file and line.

Names are imported on first use (PEP 562), so importing this package (as `moe-apps --help` does
through the CLI) does not pull in numpy, urllib or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "Cifar10Data": "cifar10", "load_cifar10": "cifar10",
    "DownloadReport": "download", "download_dataset": "download", "download_file": "download",
    "DatasetError": "errors", "DownloadError": "errors", "MissingDataError": "errors",
    "dataset_status": "files",
    "Items": "movielens", "MovieLensData": "movielens", "Ratings": "movielens",
    "Users": "movielens", "load_movielens": "movielens",
    "TranslationPairs": "multi30k", "load_multi30k": "multi30k",
    "resolve_data_root": "paths",
    "DATASETS": "registry", "DatasetSpec": "registry", "Download": "registry",
    "get_spec": "registry",
    "Check": "verify", "VerifyReport": "verify", "verify_dataset": "verify",
}
__all__ = [
    "Check",
    "Cifar10Data",
    "DATASETS",
    "DatasetError",
    "DatasetSpec",
    "Download",
    "DownloadError",
    "DownloadReport",
    "Items",
    "MissingDataError",
    "MovieLensData",
    "Ratings",
    "TranslationPairs",
    "Users",
    "VerifyReport",
    "dataset_status",
    "download_dataset",
    "download_file",
    "get_spec",
    "load_cifar10",
    "load_movielens",
    "load_multi30k",
    "resolve_data_root",
    "verify_dataset",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'moe_apps.datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moe_apps.datasets.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from moe_apps.datasets.cifar10 import Cifar10Data, load_cifar10
    from moe_apps.datasets.download import DownloadReport, download_dataset, download_file
    from moe_apps.datasets.errors import DatasetError, DownloadError, MissingDataError
    from moe_apps.datasets.files import dataset_status
    from moe_apps.datasets.movielens import Items, MovieLensData, Ratings, Users, load_movielens
    from moe_apps.datasets.multi30k import TranslationPairs, load_multi30k
    from moe_apps.datasets.paths import resolve_data_root
    from moe_apps.datasets.registry import DATASETS, DatasetSpec, Download, get_spec
    from moe_apps.datasets.verify import Check, VerifyReport, verify_dataset
