"""Download the drinks dataset: try mirror URLs in order, refuse what is not the archive (Google Drive answers a
large file with an HTML "virus scan" or quota page), trust an archive only when every file the project reads
matches its SHA-256 in dataset/drinks.sha256, and extract it safely (no links, a cap on its size). An archive
downloaded by hand is installed the same way.

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

from seglib.files import DataError, sha256_of

DEFAULT_DATA_PATH = "dataset/drinks"
ANNOTATION_FILES = {"train": "segmentation_train.json", "test": "segmentation_test.json"}

# A public copy of the archive (Google Drive, shared by a course that uses the book). DRINKS_URL overrides it.
DEFAULT_URL = "https://drive.usercontent.google.com/download?id=1AdMbVK110IKLG7wJKhga2N2fitV1bVPA&export=download&confirm=t"
# the SHA-256 of every file the project reads (both JSON files and the 1052 photos), as sha256sum writes them
MANIFEST = Path(__file__).resolve().parents[1] / "dataset" / "drinks.sha256"
# the archive is 147 MB of JPEGs and unpacks to about as much in about 1,100 files (some for object detection)
MAX_MEMBERS = 5000
MAX_BYTES = 1 << 30
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


def published_checksums():
    """{file name: SHA-256} of every file of the dataset the project reads (dataset/drinks.sha256), the two JSON
    files first."""
    sums = {}
    for line in MANIFEST.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name] = digest
    return sums


def checked_members(tar, archive):
    """The members of ``tar``, each a plain file or folder, at most MAX_MEMBERS of them and MAX_BYTES in all.

    The dataset holds no link: a link that points inside the extraction folder passes tarfile's "data" filter
    but can point outside once the folder is moved into place, so every link is refused."""
    members, total = [], 0
    for member in tar:
        if len(members) == MAX_MEMBERS:
            raise DataError(f"{archive}: more than {MAX_MEMBERS} members; the drinks archive has about 1,100")
        if member.issym() or member.islnk():
            raise DataError(f"{archive}: {member.name} is a link; the drinks archive has none")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive}: {member.name} is not a file or a folder")
        total += member.size
        if total > MAX_BYTES:
            raise DataError(f"{archive}: unpacks to more than {MAX_BYTES >> 20} MiB; the drinks archive to about 150")
        members.append(member)
    return members


def _extract_verified(archive, target, checksums):
    """Extract ``archive`` safely, check every file ``checksums`` names, then move its ``drinks/`` folder to
    ``target``."""
    problem = archive_problem(archive)
    if problem:
        raise DataError(f"{archive}: {problem}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                # the "data" filter still refuses members that escape tmp, and absolute names
                tar.extractall(tmp, members=checked_members(tar, archive), filter="data")
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt archive raises EOFError, zlib.error, ...
            raise DataError(f"{archive}: cannot extract archive safely ({type(e).__name__}: {e})") from None
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
    files named in ``checksums`` (default: every file the project reads, dataset/drinks.sha256) are all there
    and match. A download that is not the archive, cannot be read whole or fails its checksums is deleted and
    the next URL is tried. Nothing is left half-written.
    """
    target = Path(target)
    if (target / ANNOTATION_FILES["train"]).is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise DataError(f"{target}: folder exists but has no {ANNOTATION_FILES['train']}; move it away first")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()
    checksums = published_checksums() if checksums is None else checksums
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
