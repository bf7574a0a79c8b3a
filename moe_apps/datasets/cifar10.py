"""CIFAR-10 (Krizhevsky 2009, python version): a checked loader into uint8 image tensors.

`load_cifar10(root)` reads `cifar10/cifar-10-batches-py/` when it is complete, else the tarball
`cifar10/cifar-10-python.tar.gz` directly (no extraction, no torchvision download). The batch
files are pickles; they are read with a restricted unpickler that only builds dicts, lists,
strings, numbers and numpy arrays, so a tampered file cannot run code.

Checked: every batch has `num_cases_per_batch` (from batches.meta) rows of 3072 uint8 values and as
many labels, labels are in 0..9, there are 10 class names. Any failure (truncated gzip/tar, missing
member, wrong shape, bad label) raises `DatasetError` naming the file (and member).
"""

from __future__ import annotations

import importlib
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moe_apps.datasets.errors import DatasetError
from moe_apps.datasets.files import require_files
from moe_apps.datasets.paths import resolve_data_root
from moe_apps.datasets.registry import (
    CIFAR10_BATCHES,
    CIFAR10_FOLDER,
    CIFAR10_MEMBERS,
    CIFAR10_TARBALL,
    get_spec,
)

if TYPE_CHECKING:
    import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)

# What a CIFAR pickle may name: numpy's array reconstruction (old and new module paths) and the
# codec Python 3 uses to pickle bytes at protocol 2. Nothing else is ever loaded.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("_codecs", "encode"): ("_codecs",),
}


@dataclass(frozen=True)
class Cifar10Data:
    """CIFAR-10: images uint8 `(N, 3, 32, 32)` (channels R, G, B), labels int64 in 0..9."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, where: str):
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> object:
        modules = _ALLOWED.get((module, name))
        if modules is None:
            raise DatasetError(f"pickle refers to {module}.{name}, which a CIFAR-10 batch never "
                               "does (corrupt or tampered file)", path=self.where)
        for candidate in modules:
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise DatasetError(f"cannot resolve {module}.{name}", path=self.where)


def unpickle_batch(raw: bytes, where: str) -> dict[str, object]:
    """A CIFAR pickle as a dict with str keys (byte keys are decoded); `where` is for messages."""
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), where).load()
    except DatasetError:
        raise
    except Exception as error:  # any unpickling failure means a damaged file
        raise DatasetError(f"not a readable pickle ({type(error).__name__}: {error})",
                           path=where) from error
    if not isinstance(obj, dict):
        raise DatasetError(f"expected a dict, got {type(obj).__name__}", path=where)
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def load_cifar10(root: str | Path | None = None) -> Cifar10Data:
    """Load CIFAR-10 from the data root (extracted folder if complete, else the tar.gz)."""
    import torch

    data_root = resolve_data_root(root)
    found = require_files(get_spec("cifar10"), data_root)
    if found == (CIFAR10_TARBALL,):
        members = read_tar_members(data_root / CIFAR10_TARBALL)
    else:
        folder = data_root / CIFAR10_FOLDER
        members = {str(folder / name): (folder / name).read_bytes() for name in CIFAR10_MEMBERS}
    arrays = parse_members(members)
    return Cifar10Data(
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        class_names=arrays["class_names"],
    )


def read_tar_members(path: Path) -> dict[str, bytes]:
    """The bytes of every `cifar-10-batches-py/<member>` of the tarball, keyed `tar.gz:member`."""
    wanted = {f"cifar-10-batches-py/{name}": name for name in CIFAR10_MEMBERS}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    handle = tar.extractfile(info)
                    assert handle is not None  # a regular file always has a handle
                    found[wanted[info.name]] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"truncated or corrupt tar.gz ({type(error).__name__}: {error}); "
                           "delete it and download it again", path=path) from error
    missing = [name for name in CIFAR10_MEMBERS if name not in found]
    if missing:
        raise DatasetError(f"tarball lacks cifar-10-batches-py/{', '.join(missing)}", path=path)
    return {f"{path}:{name}": found[name] for name in CIFAR10_MEMBERS}


def parse_members(members: dict[str, bytes]) -> dict:
    """Check and stack the batches; `members` maps 'where' (ends with the member name) -> bytes.

    Returns numpy `train_images` (N, 3, 32, 32) uint8, `train_labels` int64, `test_images`,
    `test_labels` and `class_names`.
    """
    by_name = {where.rsplit("/", 1)[-1].rsplit(":", 1)[-1]: where for where in members}
    meta_where = by_name["batches.meta"]
    meta = unpickle_batch(members[meta_where], meta_where)
    names = meta.get("label_names")
    per_batch = meta.get("num_cases_per_batch")
    if not (isinstance(names, list) and len(names) == NUM_CLASSES
            and all(isinstance(n, str | bytes) for n in names)):
        raise DatasetError(f"label_names must be {NUM_CLASSES} names, got {names!r}",
                           path=meta_where)
    if not isinstance(per_batch, int) or per_batch <= 0:
        raise DatasetError(f"num_cases_per_batch must be a positive int, got {per_batch!r}",
                           path=meta_where)
    class_names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        where = by_name[name]
        content = unpickle_batch(members[where], where)
        data, labels = content.get("data"), content.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (
                per_batch, 3072):
            shape = getattr(data, "shape", None)
            dtype = getattr(data, "dtype", type(data).__name__)
            raise DatasetError(f"'data' must be uint8 of shape ({per_batch}, 3072), got {dtype} "
                               f"{shape}", path=where)
        if not isinstance(labels, list) or len(labels) != per_batch:
            count = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise DatasetError(f"'labels' must be a list of {per_batch} ints, got {count}",
                               path=where)
        labels_n = np.asarray(labels)
        if labels_n.dtype.kind not in "iu":
            raise DatasetError(f"labels must be integers, got {labels_n.dtype}", path=where)
        bad = np.flatnonzero((labels_n < 0) | (labels_n >= NUM_CLASSES))
        if bad.size:
            raise DatasetError(f"label of image {int(bad[0])} is {int(labels_n[bad[0]])}, must be "
                               f"in 0..{NUM_CLASSES - 1}", path=where)
        return data.reshape(per_batch, *IMAGE_SHAPE), labels_n.astype(np.int64)

    train = [batch(name) for name in CIFAR10_BATCHES]
    test_images, test_labels = batch("test_batch")
    return {
        "train_images": np.concatenate([images for images, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": np.ascontiguousarray(test_images),
        "test_labels": test_labels,
        "class_names": class_names,
    }
