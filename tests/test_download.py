"""The dataset downloader, against an HTTP server on 127.0.0.1 serving archives the tests build."""
import functools
import hashlib
import io
import json
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data_generator as dg
from data_generator import DataError


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _archive(path, extra=()):
    train = json.dumps({"_via_img_metadata": {}}).encode()
    test = b'{"x": 1}'
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "drinks/segmentation_train.json", train)
        _add(tar, "drinks/segmentation_test.json", test)
        _add(tar, "drinks/0000000.jpg", b"jpeg bytes")
        for name, data in extra:
            _add(tar, name, data)
    return {"segmentation_train.json": hashlib.sha256(train).hexdigest(),
            "segmentation_test.json": hashlib.sha256(test).hexdigest()}


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_good_archive(server, tmp_path):
    root, url = server
    sums = _archive(root / "drinks.tar.gz")
    target = tmp_path / "dataset" / "drinks"
    assert dg.download_drinks(target, f"{url}/drinks.tar.gz", sums) == target
    assert (target / "segmentation_train.json").is_file() and (target / "0000000.jpg").read_bytes() == b"jpeg bytes"
    assert not list(target.parent.glob(".extract-*")) and not list(target.parent.glob("*.part"))


def test_bad_checksum(server, tmp_path):
    root, url = server
    sums = _archive(root / "drinks.tar.gz")
    sums["segmentation_test.json"] = "0" * 64
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match="segmentation_test.json has SHA-256 .* expected 0000"):
        dg.download_drinks(target, f"{url}/drinks.tar.gz", sums)
    assert not target.exists() and not list(target.parent.glob(".extract-*"))


def test_malicious_member_is_refused(server, tmp_path):
    root, url = server
    sums = _archive(root / "drinks.tar.gz", extra=[("../../escaped.txt", b"owned")])
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match="cannot extract archive safely"):
        dg.download_drinks(target, f"{url}/drinks.tar.gz", sums)
    assert not target.exists()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_offline_says_what_to_do(server, tmp_path):
    _, url = server
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match=r"download failed .*Offline\? Get drinks.tar.gz by hand"):
        dg.download_drinks(target, f"{url}/missing.tar.gz", {})
    assert not list(target.parent.glob("*.part")) and not (target.parent / "drinks.tar.gz").exists()


def test_existing_dataset_is_not_downloaded_again(tmp_path):
    target = tmp_path / "drinks"
    target.mkdir()
    (target / "segmentation_train.json").write_text("{}")
    assert dg.download_drinks(target, "http://127.0.0.1:9/never", {}) == target
