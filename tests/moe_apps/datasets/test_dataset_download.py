"""Downloads against a local HTTP server (never the network): success, checksum, offline, zips."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from datasets_fixtures import write_ml100k, write_multi30k

from moe_apps.datasets import (
    DATASETS,
    DatasetError,
    Download,
    DownloadError,
    download_dataset,
    download_file,
    load_movielens,
    load_multi30k,
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/short":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) for an http.server on 127.0.0.1 in a thread."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.gz"  # nothing listens there any more


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_download_file_success(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    payload = bytes(range(256)) * 1000
    (served / "blob.bin").write_bytes(payload)
    target = tmp_path / "out" / "blob.bin"
    download_file(f"{base}/blob.bin", target, sha256=hashlib.sha256(payload).hexdigest(),
                  md5=hashlib.md5(payload).hexdigest(), progress=True)
    assert target.read_bytes() == payload
    assert _leftovers(target.parent) == []


def test_file_url(tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_bytes(b"hello\n")
    target = tmp_path / "copy" / "source.txt"
    download_file(source.as_uri(), target, sha256=hashlib.sha256(b"hello\n").hexdigest(),
                  progress=False)
    assert target.read_bytes() == b"hello\n"


@pytest.mark.parametrize("kind", ["sha256", "md5"])
def test_checksum_mismatch_leaves_nothing(server: tuple[str, Path], tmp_path: Path,
                                          kind: str) -> None:
    base, served = server
    (served / "blob.bin").write_bytes(b"tampered")
    target = tmp_path / "out" / "blob.bin"
    with pytest.raises(DownloadError, match=f"{kind} of the download from {base}/blob.bin is"):
        download_file(f"{base}/blob.bin", target, progress=False, **{kind: "0" * 64})
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_checksum_mismatch_keeps_the_old_file(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    (served / "blob.bin").write_bytes(b"new but wrong")
    target = tmp_path / "blob.bin"
    target.write_bytes(b"old")
    with pytest.raises(DownloadError):
        download_file(f"{base}/blob.bin", target, sha256="0" * 64, progress=False)
    assert target.read_bytes() == b"old"


def test_connection_refused_is_a_clear_offline_error(tmp_path: Path) -> None:
    url = _closed_port_url()
    target = tmp_path / "multi30k" / "file.gz"
    with pytest.raises(DownloadError) as info:
        download_file(url, target, dataset="multi30k", progress=False)
    message = str(info.value)
    assert "could not download 'multi30k'" in message
    assert url in message and str(target.parent) in message and "offline" in message
    assert not target.exists() and _leftovers(target.parent) == []


def test_connection_lost_midway_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    target = tmp_path / "out" / "short.bin"
    with pytest.raises(DownloadError, match="connection lost"):
        download_file(f"{base}/short", target, progress=False)
    assert not target.exists() and _leftovers(target.parent) == []


def test_http_404(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(f"{base}/nope.gz", tmp_path / "nope.gz", progress=False)
    assert info.value.status == 404


def _multi30k_spec(base: str, served: Path) -> object:
    """The multi30k spec with every URL on the local server and sha256 of the served fixtures."""
    spec = DATASETS["multi30k"]
    downloads = []
    for item in spec.downloads:
        name = item.target.split("/")[-1]
        path = served / "multi30k" / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
        downloads.append(dataclasses.replace(item, url=f"{base}/multi30k/{name}", sha256=digest))
    return dataclasses.replace(spec, downloads=tuple(downloads))


def test_download_dataset_multi30k(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    write_multi30k(served)  # train, val, test_2016_flickr; no test_2017 files on the server
    root = tmp_path / "data"
    report = download_dataset(_multi30k_spec(base, served), root, progress=False)
    assert sorted(report.fetched) == sorted(
        f"multi30k/{s}.{lang}.gz" for s in ("train", "val", "test_2016_flickr")
        for lang in ("de", "en"))
    assert len(report.skipped) == 4 and all("test_2017" in s for s in report.skipped)
    assert {k: len(v) for k, v in load_multi30k(root).items()} == {
        "train": 3, "val": 3, "test_2016_flickr": 3}
    # a second run finds everything in place and fetches nothing
    again = download_dataset(_multi30k_spec(base, served), root, progress=False)
    assert again.fetched == [] and len(again.present) == 6


def test_download_dataset_offline_names_dataset_url_and_folder(tmp_path: Path) -> None:
    spec = DATASETS["multi30k"]
    url = _closed_port_url()
    offline = dataclasses.replace(spec, downloads=tuple(
        dataclasses.replace(item, url=url) for item in spec.downloads))
    with pytest.raises(DownloadError) as info:
        download_dataset(offline, tmp_path, progress=False)
    message = str(info.value)
    assert "'multi30k'" in message and url in message and str(tmp_path / "multi30k") in message


def test_complete_dataset_is_not_fetched_again(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    spec = DATASETS["movielens-100k"]
    offline = dataclasses.replace(spec, downloads=tuple(
        dataclasses.replace(item, url=_closed_port_url()) for item in spec.downloads))
    report = download_dataset(offline, tmp_path, progress=False)  # would fail if it fetched
    assert report.fetched == [] and report.present == ["movielens/ml-100k"]


def _ml100k_zip(served: Path, tmp_path: Path, drop: tuple[str, ...] = ()) -> None:
    source = write_ml100k(tmp_path / "zip-source")
    for name in drop:
        (source / name).unlink()
    shutil.make_archive(str(served / "ml-100k"), "zip", root_dir=source.parent, base_dir="ml-100k")


def test_download_zip_extracts_into_place(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    _ml100k_zip(served, tmp_path)
    spec = dataclasses.replace(
        DATASETS["movielens-100k"], sha256={},  # the tiny fixture is not the real data
        downloads=(dataclasses.replace(DATASETS["movielens-100k"].downloads[0],
                                       url=f"{base}/ml-100k.zip"),))
    root = tmp_path / "data"
    report = download_dataset(spec, root, progress=False)
    assert report.fetched == ["movielens/ml-100k"]
    assert len(load_movielens("movielens-100k", root).ratings) == 8
    assert sorted(p.name for p in (root / "movielens").iterdir()) == ["ml-100k"]  # zip removed


def test_zip_with_wrong_files_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    _ml100k_zip(served, tmp_path)
    spec = dataclasses.replace(  # keeps the registry's sha256 of the real files
        DATASETS["movielens-100k"],
        downloads=(dataclasses.replace(DATASETS["movielens-100k"].downloads[0],
                                       url=f"{base}/ml-100k.zip"),))
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="in the zip has sha256 .* nothing was put in place"):
        download_dataset(spec, root, progress=False)
    assert list((root / "movielens").iterdir()) == []


def test_truncated_zip(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    _ml100k_zip(served, tmp_path)
    raw = (served / "ml-100k.zip").read_bytes()
    (served / "ml-100k.zip").write_bytes(raw[: len(raw) // 2])
    item = Download(url=f"{base}/ml-100k.zip", target="movielens/ml-100k.zip",
                    extract_to="movielens/ml-100k", extract_member="ml-100k")
    spec = dataclasses.replace(DATASETS["movielens-100k"], sha256={}, downloads=(item,))
    with pytest.raises(DatasetError, match=r"ml-100k\.zip: truncated or corrupt zip"):
        download_dataset(spec, tmp_path / "data", progress=False)
    assert list((tmp_path / "data" / "movielens").iterdir()) == []


def test_zip_lacking_a_file_names_it_and_leaves_nothing(server: tuple[str, Path],
                                                        tmp_path: Path) -> None:
    base, served = server
    _ml100k_zip(served, tmp_path, drop=("u3.test", "ub.base"))
    spec = dataclasses.replace(
        DATASETS["movielens-100k"], sha256={},
        downloads=(dataclasses.replace(DATASETS["movielens-100k"].downloads[0],
                                       url=f"{base}/ml-100k.zip"),))
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match=r"ml-100k\.zip: zip lacks ml-100k/u3\.test, "
                                           r"ml-100k/ub\.base$"):
        download_dataset(spec, root, progress=False)
    assert list((root / "movielens").iterdir()) == []
