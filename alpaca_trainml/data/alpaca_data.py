"""The original 52K Alpaca data: not committed (CC BY-NC 4.0, not ours), downloaded and verified."""

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

from alpaca_trainml.cli import UsageError
from alpaca_trainml.jsonio import atomic_write

ALPACA_DATA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_DATA_BLOB_SHA1 = "3779ddbc040543ab1834ef216c983d6fcc06cc9a"  # `git hash-object alpaca_data.json` upstream
ALPACA_DATA_ROWS = 52002


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content: sha1 of b"blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_alpaca_data(path, expected_sha1=ALPACA_DATA_BLOB_SHA1, expected_rows=ALPACA_DATA_ROWS):
    """Raise ValueError unless `path` has the expected git blob SHA-1 and row count."""
    data = Path(path).read_bytes()
    sha1 = git_blob_sha1(data)
    if sha1 != expected_sha1:
        raise ValueError(
            f"{path}: git blob SHA-1 is {sha1}, expected {expected_sha1}; the download is corrupt or changed"
        )
    try:
        rows = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list) or len(rows) != expected_rows:
        n = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise ValueError(f"{path}: expected a list of {expected_rows} rows, found {n}")
    return len(rows)


def download_alpaca_data(
    path="alpaca_data.json",
    url=ALPACA_DATA_URL,
    expected_sha1=ALPACA_DATA_BLOB_SHA1,
    expected_rows=ALPACA_DATA_ROWS,
    timeout=60,
):
    """Download the 52K Alpaca data to `path` and verify it. A file that fails the check is deleted."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise UsageError(
            f"could not download {url} ({e}). Are you offline? Fetch it elsewhere and copy it to {path}."
        ) from None
    atomic_write(path, lambda fh: fh.write(data), mode="wb")
    try:
        rows = verify_alpaca_data(path, expected_sha1, expected_rows)
    except ValueError:
        path.unlink(missing_ok=True)
        raise
    print(f"{path}: {rows} rows, git blob SHA-1 {expected_sha1} verified")
    return str(path)
