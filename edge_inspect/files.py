"""Files the product writes and checks: atomic replacement and content hashes.

Why one home: a calibration, an evidence frame, a TensorRT plan and a report are each replaced whole or
not at all, and each is recognised later by its sha256. Eight writers each did it their own way (only
some fsynced, one left its temporary behind on an error). This module imports nothing of the project,
so every stage can use it without an import circle.

    write_atomic(path, b"...")                 # a reader sees the old file or the new one, never half
    write_atomic(path, text, durable=False)    # no fsync: for files a power cut may lose (reports)
    file_sha256(path), array_sha256(bank)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder below `folder` (a folder written in full, then renamed into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def temporary_name(path: Path) -> Path:
    """The hidden sibling a file is written to before its rename; unique per process so two writers of
    the same file never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def write_atomic(path: str | Path, data: bytes | str, durable: bool = True) -> Path:
    """Replace `path` with `data` in one rename. durable: fsync the file and its folder, so the new
    content survives a power cut once this returns. The temporary is removed on any error."""
    path = Path(path)
    tmp = temporary_name(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """The hash of an array's values in C order (not of its .npy file, whose header may differ)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
