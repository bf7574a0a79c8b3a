"""A synthetic CIFAR-10 in the official tar.gz format for the vision tests: 6 batches of
``per_batch`` 32x32 images whose class shows as a coloured bar at a class-dependent row (plus noise),
so a small network learns it in a few steps."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(N, 3, 32, 32)``: noise, plus a bright 3-pixel bar at row 3 * label in channel label % 3."""
    images = rng.integers(0, 96, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, label % 3, 3 * label: 3 * label + 3, 4:28] = 255
    return images


def write_synthetic_cifar(root: Path, per_batch: int = 240, seed: int = 0) -> Path:
    """Write ``root/cifar10/cifar-10-python.tar.gz``; returns ``root``."""
    rng = np.random.default_rng(seed)
    members = {"batches.meta": {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}}
    for name in BATCHES:
        labels = rng.integers(0, 10, size=per_batch)
        data = synthetic_images(labels, rng).reshape(per_batch, 3072)
        members[name] = {"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
    path = root / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return root
