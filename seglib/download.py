"""Download the drinks dataset: try mirror URLs in order, refuse what is not the archive (Google Drive answers a
large file with an HTML "virus scan" or quota page), trust an archive only when its JSON files' SHA-256 match,
and extract it safely. An archive downloaded by hand is installed the same way.

Used through data_generator.py:

    python data_generator.py --download                                  # into dataset/drinks
    python data_generator.py --download --url URL1 --url URL2            # mirrors, tried in order
    python data_generator.py --download --archive ~/Downloads/drinks.tar.gz
"""
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from model_utils import sha256_of
from seglib.errors import DataError

DEFAULT_DATA_PATH = "dataset/drinks"
ANNOTATION_FILES = {"train": "segmentation_train.json", "test": "segmentation_test.json"}

# A public copy of the archive (Google Drive, shared by a course that uses the book). DRINKS_URL overrides it.
DEFAULT_URL = "https://drive.usercontent.google.com/download?id=1AdMbVK110IKLG7wJKhga2N2fitV1bVPA&export=download&confirm=t"
JSON_SHA256 = {
    "segmentation_train.json": "924f6aff8c8519b044bc677f14aeae6cefb82d3ba49474a5e60e7e6cda35f7b5",
    "segmentation_test.json": "60d6ac0760b5d6d32ec51044d7add99fd99047e8ca377bef02d7cb30c05a0017",
}
BY_HAND = ("Get drinks.tar.gz in a browser (dataset/README.md says where), then run: "
           "python data_generator.py --download --archive PATH")


def mirror_urls(urls=None):
    """The URLs to try, in order: ``urls``, else $DRINKS_URL (several separated by spaces), else the public copy."""
    if urls:
        return list(urls)
    return os.environ.get("DRINKS_URL", "").split() or [DEFAULT_URL]


def archive_problem(path):
    """Why the file at ``path`` is not a gzip or tar archive (an HTML page, say), or None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:2] == b"\x1f\x8b":  # gzip; tarfile checks the rest
        return None
    lower = head.lower()
    if b"<html" in lower or lower.lstrip().startswith(b"<!doctype"):
        what = "a quota-exceeded page" if b"quota" in lower else "a virus-scan or sign-in page"
        return f"got an HTML page ({what}, as Google Drive sends for large files), not the archive"
    if tarfile.is_tarfile(path):
        return None
    return f"not a gzip or tar archive (it starts with {head[:12]!r})"


def _fetch(url, dest):
    """Download ``url`` to ``dest`` with a progress bar, via a temporary name."""
    from tqdm import tqdm

    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None
    tmp.replace(dest)


def _extract_verified(archive, target, checksums):
    """Extract ``archive`` safely, check the JSON checksums, then move its ``drinks/`` folder to ``target``."""
    problem = archive_problem(archive)
    if problem:
        raise DataError(f"{archive}: {problem}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # refuses members that escape tmp, links outside, devices
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{archive}: cannot extract archive safely ({e})") from None
        found = [p.parent for p in Path(tmp).rglob(ANNOTATION_FILES["train"])]
        if not found:
            raise DataError(f"{archive}: no {ANNOTATION_FILES['train']} in the archive")
        folder = found[0]
        for name, expected in checksums.items():
            if not (folder / name).is_file():
                raise DataError(f"{archive}: {name} is missing from the archive")
            actual = sha256_of(folder / name)
            if actual != expected:
                raise DataError(f"{archive}: {name} has SHA-256 {actual}, expected {expected}")
        folder.rename(target)


def download_drinks(target=DEFAULT_DATA_PATH, urls=None, checksums=None, archive=None):
    """Make ``target`` hold the dataset; returns ``target``.

    From ``archive`` (a file the user downloaded) when given, else from ``<target's parent>/drinks.tar.gz``
    when it is there, else from the first of ``urls`` (see mirror_urls) whose answer is an archive whose two
    JSON files match ``checksums`` (default: the published SHA-256s). A download that is not the archive or
    fails its checksums is deleted and the next URL is tried. Nothing is left half-written.
    """
    target = Path(target)
    if (target / ANNOTATION_FILES["train"]).is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise DataError(f"{target}: folder exists but has no {ANNOTATION_FILES['train']}; move it away first")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()
    checksums = JSON_SHA256 if checksums is None else checksums
    given = Path(archive) if archive else target.parent / "drinks.tar.gz"
    if archive or given.is_file():
        if not given.is_file():
            raise DataError(f"{given}: archive not found")
        _extract_verified(given, target, checksums)
        return target
    failures = []
    for url in mirror_urls(urls):
        try:
            _fetch(url, given)
            _extract_verified(given, target, checksums)
            return target
        except DataError as e:
            given.unlink(missing_ok=True)  # not the archive, or not the right one: never kept, never trusted
            failures.append(str(e).replace(str(given), url))
    raise DataError(f"no URL gave the drinks archive ({'; '.join(failures)}). {BY_HAND}")


def ensure_data(data_path, url=None):
    """Return ``data_path``; download the dataset first if it is the default location and missing."""
    path = Path(data_path)
    if not path.exists() and path == Path(DEFAULT_DATA_PATH):
        print(f"{path} not found: downloading the drinks dataset")
        download_drinks(path, [url] if url else None)
    return path
