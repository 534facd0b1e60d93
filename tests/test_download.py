"""The dataset downloader, against an HTTP server on 127.0.0.1 serving archives the tests build."""
import functools
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data_generator
from seglib import download as dl
from seglib.files import DataError

ROOT = dl.Path(data_generator.__file__).parent


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
    assert dl.download_drinks(target, [f"{url}/drinks.tar.gz"], sums) == target
    assert (target / "segmentation_train.json").is_file() and (target / "0000000.jpg").read_bytes() == b"jpeg bytes"
    assert not list(target.parent.glob(".extract-*")) and not list(target.parent.glob("*.part"))


def test_bad_checksum(server, tmp_path):
    root, url = server
    sums = _archive(root / "drinks.tar.gz")
    sums["segmentation_test.json"] = "0" * 64
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match="segmentation_test.json has SHA-256 .* expected 0000"):
        dl.download_drinks(target, [f"{url}/drinks.tar.gz"], sums)
    assert not target.exists() and not list(target.parent.glob(".extract-*"))


def test_malicious_member_is_refused(server, tmp_path):
    root, url = server
    sums = _archive(root / "drinks.tar.gz", extra=[("../../escaped.txt", b"owned")])
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match="cannot extract archive safely"):
        dl.download_drinks(target, [f"{url}/drinks.tar.gz"], sums)
    assert not target.exists()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_offline_says_what_to_do(server, tmp_path):
    _, url = server
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match=r"missing.tar.gz: download failed .*Get drinks.tar.gz .*--archive PATH"):
        dl.download_drinks(target, [f"{url}/missing.tar.gz"], {})
    assert not list(target.parent.glob("*.part")) and not (target.parent / "drinks.tar.gz").exists()


HTML_SCAN = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>...</body></html>"
HTML_QUOTA = b"<html><body><p>Too many users have viewed or downloaded this file recently. Quota exceeded.</p></html>"


@pytest.mark.parametrize("page, words", [(HTML_SCAN, "virus-scan or sign-in page"), (HTML_QUOTA, "quota-exceeded")])
def test_html_answer_is_named_and_not_kept(server, tmp_path, page, words):
    root, url = server
    (root / "drive.html").write_bytes(page)
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match=f"drive.html: got an HTML page \\(a {words}.*not the archive.*--archive PATH"):
        dl.download_drinks(target, [f"{url}/drive.html"], {})
    assert not target.exists() and not list(target.parent.iterdir())


def test_not_an_archive_at_all(server, tmp_path):
    root, url = server
    (root / "blob.bin").write_bytes(b"\x00\x01binary junk" * 100)
    with pytest.raises(DataError, match="blob.bin: not a gzip or tar archive"):
        dl.download_drinks(tmp_path / "drinks", [f"{url}/blob.bin"], {})


def test_mirrors_are_tried_in_order_and_trusted_only_on_matching_checksums(server, tmp_path):
    root, url = server
    (root / "drive.html").write_bytes(HTML_SCAN)
    sums = _archive(root / "drinks.tar.gz")
    # a mirror serving another archive: a valid tar.gz whose JSON differs from the published checksums
    (root / "other").mkdir()
    with tarfile.open(root / "other" / "drinks.tar.gz", "w:gz") as tar:
        _add(tar, "drinks/segmentation_train.json", b'{"tampered": true}')
        _add(tar, "drinks/segmentation_test.json", b'{"x": 1}')
    target = tmp_path / "dataset" / "drinks"
    urls = [f"{url}/drive.html", f"{url}/other/drinks.tar.gz", f"{url}/drinks.tar.gz"]
    assert dl.download_drinks(target, urls, sums) == target
    assert json.loads((target / "segmentation_train.json").read_text()) == {"_via_img_metadata": {}}
    assert sorted(p.name for p in target.parent.iterdir()) == ["drinks", "drinks.tar.gz"]

    # all mirrors bad: every reason is listed, in one line
    target2 = tmp_path / "again" / "drinks"
    with pytest.raises(DataError) as e:
        dl.download_drinks(target2, urls[:2], sums)
    message = str(e.value)
    assert "\n" not in message and "drive.html: got an HTML page" in message
    assert "other/drinks.tar.gz: segmentation_train.json has SHA-256" in message
    assert not target2.exists() and not list(target2.parent.iterdir())


def test_archive_downloaded_by_hand(tmp_path):
    sums = _archive(tmp_path / "by-hand.tar.gz")
    target = tmp_path / "dataset" / "drinks"
    assert dl.download_drinks(target, ["http://127.0.0.1:9/never"], sums, archive=tmp_path / "by-hand.tar.gz") == target
    assert (target / "0000000.jpg").read_bytes() == b"jpeg bytes"
    assert (tmp_path / "by-hand.tar.gz").is_file()  # the user's file is left where it was

    (tmp_path / "saved-page.tar.gz").write_bytes(HTML_SCAN)
    with pytest.raises(DataError, match="saved-page.tar.gz: got an HTML page"):
        dl.download_drinks(tmp_path / "other" / "drinks", None, sums, archive=tmp_path / "saved-page.tar.gz")
    with pytest.raises(DataError, match="nothing.tar.gz: archive not found"):
        dl.download_drinks(tmp_path / "other" / "drinks", None, sums, archive=tmp_path / "nothing.tar.gz")


def test_cli_archive_flag_with_the_published_checksums(tmp_path):
    """--archive through data_generator.py: an archive with other JSON is refused by the real checksums."""
    _archive(tmp_path / "drinks.tar.gz")
    proc = subprocess.run([sys.executable, "data_generator.py", "--download", "--data-path", str(tmp_path / "d"),
                           "--archive", str(tmp_path / "drinks.tar.gz")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'drinks.tar.gz'}: segmentation_train.json has SHA-256 "
        f"{hashlib.sha256(json.dumps({'_via_img_metadata': {}}).encode()).hexdigest()}, "
        f"expected {dl.published_checksums()['segmentation_train.json']}"]
    assert not (tmp_path / "d").exists()


def test_env_lists_mirrors(monkeypatch):
    monkeypatch.setenv("DRINKS_URL", "http://a/x.tar.gz  http://b/y.tar.gz")
    assert dl.mirror_urls() == ["http://a/x.tar.gz", "http://b/y.tar.gz"]
    assert dl.mirror_urls(["http://c"]) == ["http://c"]
    monkeypatch.delenv("DRINKS_URL")
    assert dl.mirror_urls() == [dl.DEFAULT_URL]


def test_existing_dataset_is_not_downloaded_again(tmp_path):
    target = tmp_path / "drinks"
    target.mkdir()
    (target / "segmentation_train.json").write_text("{}")
    assert dl.download_drinks(target, ["http://127.0.0.1:9/never"], {}) == target


def test_truncated_archive_is_one_line_removed_and_the_next_mirror_is_tried(server, tmp_path):
    root, url = server
    sums = _archive(root / "good.tar.gz", extra=[("drinks/big.bin", bytes(range(256)) * 4000)])
    whole = (root / "good.tar.gz").read_bytes()
    (root / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])  # gzip ends early: EOFError inside tarfile
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match=r"cut.tar.gz: cannot extract archive safely \((EOFError|ReadError)"):
        dl.download_drinks(target, [f"{url}/cut.tar.gz"], sums)
    assert not (target.parent / "drinks.tar.gz").exists() and not target.exists()
    assert dl.download_drinks(target, [f"{url}/cut.tar.gz", f"{url}/good.tar.gz"], sums) == target


def _link(tar, name, to, hard=False):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), to
    tar.addfile(info)


@pytest.mark.parametrize("hard", [False, True])
def test_every_link_member_is_refused(tmp_path, hard):
    """A link to a file inside the extraction folder passes tarfile's data filter, and can point outside once
    the folder is moved into place: the dataset has no links, so none is accepted."""
    sums = _archive(tmp_path / "a.tar.gz")
    with tarfile.open(tmp_path / "a.tar.gz") as src, tarfile.open(tmp_path / "b.tar.gz", "w:gz") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
        _link(dst, "drinks/0000001.jpg", "drinks/0000000.jpg" if hard else "0000000.jpg", hard)
    target = tmp_path / "dataset" / "drinks"
    with pytest.raises(DataError, match="b.tar.gz: drinks/0000001.jpg is a link; the drinks archive has none"):
        dl.download_drinks(target, None, sums, archive=tmp_path / "b.tar.gz")
    assert not target.exists()


def test_archive_size_and_member_count_are_capped(tmp_path, monkeypatch):
    sums = _archive(tmp_path / "a.tar.gz", extra=[(f"drinks/{i}.txt", b"x" * 100) for i in range(20)])
    target = tmp_path / "dataset" / "drinks"
    monkeypatch.setattr(dl, "MAX_MEMBERS", 10)
    with pytest.raises(DataError, match="a.tar.gz: more than 10 members"):
        dl.download_drinks(target, None, sums, archive=tmp_path / "a.tar.gz")
    monkeypatch.setattr(dl, "MAX_MEMBERS", 100)
    monkeypatch.setattr(dl, "MAX_BYTES", 1000)
    with pytest.raises(DataError, match="a.tar.gz: unpacks to more than"):
        dl.download_drinks(target, None, sums, archive=tmp_path / "a.tar.gz")
    assert not target.exists()


def test_every_photo_is_checked_against_the_manifest(tmp_path, drinks):
    """The manifest names all 1054 files the project reads, and the clean copy matches it; an archive whose
    photo differs from it is refused, not only one whose JSON files do."""
    sums = dl.published_checksums()
    assert len(sums) == 1054 and list(sums)[:2] == ["segmentation_train.json", "segmentation_test.json"]
    assert all(dl.sha256_of(drinks / name) == digest for name, digest in sums.items())
    small = {"segmentation_train.json": sums["segmentation_train.json"], "0000000.jpg": sums["0000000.jpg"]}
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        tar.add(drinks / "segmentation_train.json", "drinks/segmentation_train.json")
        _add(tar, "drinks/0000000.jpg", b"another photo")
    with pytest.raises(DataError, match="a.tar.gz: 0000000.jpg has SHA-256"):
        dl.download_drinks(tmp_path / "d" / "drinks", None, small, archive=tmp_path / "a.tar.gz")
