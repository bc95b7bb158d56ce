"""Output folders: refused with one clear line when they cannot hold what a command writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class FolderError(ValueError):
    """An output folder that is a file, or that cannot be created or written."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_out_folder(path: str | Path, what: str = "--out") -> Path:
    """Make sure ``path`` is a folder this process can write in, creating it (and its parents) if needed."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise FolderError(f"{what} {path}: exists and is not a folder")
    for parent in out.parents:  # a file in the way reads better than "Not a directory"
        if parent.exists():
            if not parent.is_dir():
                raise FolderError(f"{what} {path}: {parent} is a file, not a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FolderError(f"{what} {path}: cannot create the folder ({_reason(exc)})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".tdml-write-check-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FolderError(f"{what} {path}: cannot write in the folder ({_reason(exc)})") from None
    return out
