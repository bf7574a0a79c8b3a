"""Where datasets are looked for: `--data-dir`, else `$MOE_APPS_DATA`, else `~/.cache/moe-apps`.

Layout under the root (the layout of the project's shared data folder):

    movielens/ml-100k/              the official unzipped MovieLens 100K folder
    movielens/ml-1m/                the official unzipped MovieLens 1M folder
    cifar10/cifar-10-python.tar.gz  the python-version tarball (or cifar10/cifar-10-batches-py/)
    multi30k/<split>.<lang>.gz      the raw Multi30k task-1 files, e.g. multi30k/train.de.gz
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "MOE_APPS_DATA"
DEFAULT_ROOT = Path("~/.cache/moe-apps")


def resolve_data_root(data_dir: str | Path | None = None) -> Path:
    """The data root: `data_dir` if given, else `$MOE_APPS_DATA` if set, else `~/.cache/moe-apps`.

    The folder need not exist (it is created by a download); `~` is expanded and the result is
    absolute.
    """
    if data_dir is not None and str(data_dir) != "":
        chosen = Path(data_dir)
    elif os.environ.get(DATA_ENV):
        chosen = Path(os.environ[DATA_ENV])
    else:
        chosen = DEFAULT_ROOT
    return chosen.expanduser().absolute()
