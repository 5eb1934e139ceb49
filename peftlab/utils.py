"""Small shared helpers: atomic writes, stable hashing."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    mask = os.umask(0)  # reading it means setting it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (same extension, unique per process); on success it is synced and
    replaces ``path``, on error it is removed. A reader (or a killed run) sees the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the file is the user's, as open() would make it
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_figure(fig, path: str | Path, **savefig_kwargs) -> None:
    """A matplotlib figure written atomically."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rows as CSV with a header (``fields``, default the first row's keys; other keys are left out), atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` by renames, on error it is removed.

    A kill between the two renames leaves the previous version at ``.<name>.old``; ``recover_dir`` puts it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        old = _old(path)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | Path) -> None:
    """Undo a replacement that ``atomic_dir`` was killed in the middle of."""
    path = Path(path)
    if not path.exists() and _old(path).exists():
        os.replace(_old(path), path)


def stable_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
