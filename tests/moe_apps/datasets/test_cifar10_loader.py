"""CIFAR-10 loader: a two-image-per-batch tarball in the official layout, bad files, real data."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets_fixtures import (
    CIFAR_BATCHES,
    CIFAR_CLASSES,
    cifar_batch,
    cifar_members,
    write_cifar_tar,
)

from moe_apps.datasets import Cifar10Data, DatasetError, MissingDataError, load_cifar10


def _expected_pixels(index: int, image: int, channel: int) -> int:
    return index * 16 + image * 4 + channel  # how datasets_fixtures.cifar_batch fills them


def test_loads_tarball(cifar_root: Path) -> None:
    data = load_cifar10(cifar_root)
    assert isinstance(data, Cifar10Data)
    assert data.class_names == CIFAR_CLASSES
    assert data.train_images.shape == (10, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (2, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64
    # batches in order 1..5, each with labels [i, i + 3]
    assert data.train_labels.tolist() == [0, 3, 1, 4, 2, 5, 3, 6, 4, 7]
    assert data.test_labels.tolist() == [5, 8]
    for row in range(10):
        batch, image = divmod(row, 2)
        for channel in range(3):
            plane = data.train_images[row, channel]
            assert torch.all(plane == _expected_pixels(batch, image, channel))
    assert torch.all(data.test_images[1, 2] == _expected_pixels(5, 1, 2))


def test_channel_planar_layout_is_reshaped_row_major(tmp_path: Path) -> None:
    batch = cifar_batch(0)
    batch["data"] = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    write_cifar_tar(tmp_path, cifar_members({"data_batch_1": batch}))
    image = load_cifar10(tmp_path).train_images[0]
    flat = batch["data"][0]
    # pixel (channel c, row y, column x) is flat[c * 1024 + y * 32 + x]
    for c, y, x in ((0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 31)):
        assert int(image[c, y, x]) == int(flat[c * 1024 + y * 32 + x])


def test_loads_extracted_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, raw in cifar_members().items():
        (folder / name).write_bytes(raw)
    data = load_cifar10(tmp_path)
    assert data.train_labels.tolist() == [0, 3, 1, 4, 2, 5, 3, 6, 4, 7]


def test_byte_keys_as_in_python2_pickles(tmp_path: Path) -> None:
    def as_bytes(obj: dict) -> dict:
        return {k.encode(): ([n.encode() for n in v] if k == "label_names" else v)
                for k, v in obj.items()}
    overrides = {name: as_bytes(cifar_batch(i)) for i, name in enumerate(CIFAR_BATCHES)}
    overrides["batches.meta"] = as_bytes({"label_names": CIFAR_CLASSES, "num_cases_per_batch": 2})
    write_cifar_tar(tmp_path, cifar_members(overrides))
    assert load_cifar10(tmp_path).class_names == CIFAR_CLASSES


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="cifar-10-python.tar.gz") as info:
        load_cifar10(tmp_path)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(info.value)


def test_truncated_tarball(cifar_root: Path) -> None:
    path = cifar_root / "cifar10" / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: truncated or corrupt"):
        load_cifar10(cifar_root)


def test_member_missing_from_tarball(tmp_path: Path) -> None:
    members = cifar_members()
    del members["data_batch_3"]
    write_cifar_tar(tmp_path, members)
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/data_batch_3"):
        load_cifar10(tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_cifar_tar(tmp_path, cifar_members({"data_batch_2": cifar_batch(1, labels=[3, 10])}))
    with pytest.raises(DatasetError, match=r"data_batch_2: label of image 1 is 10, must be in 0\.\.9"):
        load_cifar10(tmp_path)


def test_wrong_number_of_images(tmp_path: Path) -> None:
    batch = cifar_batch(5)
    batch["data"] = batch["data"][:1]
    write_cifar_tar(tmp_path, cifar_members({"test_batch": batch}))
    with pytest.raises(DatasetError, match=r"test_batch: 'data' must be uint8 of shape \(2, 3072\)"):
        load_cifar10(tmp_path)


def test_wrong_number_of_labels(tmp_path: Path) -> None:
    write_cifar_tar(tmp_path, cifar_members({"data_batch_4": cifar_batch(3, labels=[1, 2, 3])}))
    with pytest.raises(DatasetError, match=r"data_batch_4: 'labels' must be a list of 2 ints, got 3"):
        load_cifar10(tmp_path)


def test_bad_meta(tmp_path: Path) -> None:
    meta = {"label_names": CIFAR_CLASSES[:9], "num_cases_per_batch": 2}
    write_cifar_tar(tmp_path, cifar_members({"batches.meta": meta}))
    with pytest.raises(DatasetError, match="batches.meta: label_names must be 10 names"):
        load_cifar10(tmp_path)


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    members = cifar_members()
    members["data_batch_1"] = pickle.dumps({"data": _Boom()}, protocol=2)
    write_cifar_tar(tmp_path, members)
    with pytest.raises(DatasetError, match=r"data_batch_1: pickle refers to (__builtin__|builtins)\.print"):
        load_cifar10(tmp_path)
    assert "must never run" not in capsys.readouterr().out


def test_garbage_member(tmp_path: Path) -> None:
    members = cifar_members()
    members["data_batch_5"] = b"not a pickle at all"
    write_cifar_tar(tmp_path, members)
    with pytest.raises(DatasetError, match="data_batch_5: not a readable pickle"):
        load_cifar10(tmp_path)


def test_tar_is_a_real_gzip_tar(cifar_root: Path) -> None:
    # guards the fixture itself: the official layout is cifar-10-batches-py/<member> in a .tar.gz
    with tarfile.open(cifar_root / "cifar10" / "cifar-10-python.tar.gz", "r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"cifar-10-batches-py/{n}" for n in
                                                ["batches.meta", *CIFAR_BATCHES])


@pytest.fixture(scope="module")
def real_cifar() -> Cifar10Data:
    from tests.conftest import SHARED_DATA  # the folder the shared_data fixture uses

    root = Path(os.environ.get("MOE_APPS_DATA", SHARED_DATA))
    if not (root / "cifar10").is_dir():
        pytest.skip(f"real data folder {root} has no cifar10/")
    return load_cifar10(root)


@pytest.mark.shared_data
def test_real_cifar10(real_cifar: Cifar10Data) -> None:
    data = real_cifar
    assert data.train_images.shape == (50_000, 3, 32, 32)
    assert data.test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [5_000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1_000] * 10
    assert data.class_names[0] == "airplane" and data.class_names[9] == "truck"
    # known facts about the official files (shared/data/MANIFEST.md)
    assert data.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert data.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert data.train_images[0, 0, 0, :3].tolist() == [59, 43, 50]  # red plane starts 59, 43, 50
    assert data.train_images[0, 2, 31, -1].item() == 72  # blue plane ends with 72
    assert torch.bincount(data.train_labels[:10_000]).tolist() == [
        1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
