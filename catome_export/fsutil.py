"""File helpers for build artifacts: atomic writes, hashes, and a build lock.

Every artifact a later load trusts is written to a temp file in its final
folder and moved into place with ``os.replace``, so a crash leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


@contextmanager
def _atomic_target(path: Path) -> Iterator[tuple[int, Path]]:
    """A temp file (fd, path) in ``path``'s folder with the usual permissions, moved onto ``path`` with
    ``os.replace`` when the block ends normally and removed when it raises (``path`` is then untouched).
    The caller writes it and fsyncs it before the block ends."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write ``path`` through a temp file in the same folder: flushed, fsynced and moved into place with
    ``os.replace`` when the block ends normally, removed when it raises (``path`` is then untouched)."""
    with _atomic_target(Path(path)) as (fd, _tmp), os.fdopen(fd, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` (for writers that take a file name, e.g. ``savefig``), fsync the result and
    move it onto ``path`` atomically. A missing folder or an OS error is a CatomeError naming ``path``;
    nothing is left behind on failure and an existing ``path`` is untouched."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise CatomeError(f"cannot write {target}: the folder {folder} does not exist; create it first")
    try:
        with _atomic_target(target) as (fd, tmp):
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        raise CatomeError(f"cannot write {target}: {exc}") from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_file(path: str | Path, flag: str) -> Path:
    """Raise a CatomeError unless a file can be written at ``path`` (checked before long work, so a result is
    never computed only to be lost). The nearest existing folder above it is probed with a temp file, which is
    removed again; nothing else is created."""
    target = Path(path)
    if target.is_dir():
        raise CatomeError(f"{flag} {target} is a folder: give a file name")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CatomeError(f"cannot write {flag} {target}: {folder} is a file, not a folder; choose another place")
    failure = _write_probe(folder)
    if failure is not None:
        raise CatomeError(f"cannot write {flag} {target}: {folder} is not writable ({failure.strerror or failure}); "
                          "choose a writable place")
    return target


def _write_probe(folder: Path) -> OSError | None:
    """Create and remove a temp file in ``folder``: None when that works, else the error."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".catome-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Raise a CatomeError unless files can be written in the folder ``path`` (made later if missing); checked
    before long work. Nothing is created."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CatomeError(f"{flag} {target} is a file, not a folder: choose a folder")
    if target.is_dir():
        failure = _write_probe(target)
        if failure is not None:
            raise CatomeError(f"cannot write {flag} {target}: the folder is not writable "
                              f"({failure.strerror or failure}); choose a writable place")
        return target
    check_writable_file(target, flag)
    return target


class Outputs:
    """Writes a command's result files at the end of its work; a write that fails (disk full, folder removed
    or made read-only during the run) does not lose the result: it is written to a folder of its own under
    the temp folder instead, and :meth:`finish` raises one CatomeError that says where each one went."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self._kept: Path | None = None

    def save(self, path: str | Path, write: Callable[[Path], Any], flag: str) -> Path | None:
        """``write(path)``; on failure the same into the keep folder. Returns where it was written (None when
        nowhere)."""
        target = Path(path)
        try:
            write(target)
            return target
        except (OSError, CatomeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            if self._kept is None:
                self._kept = Path(tempfile.mkdtemp(prefix="catome-export-kept-"))
            kept = self._kept / (target.name or "result")
            write(kept)
        except (OSError, CatomeError) as exc:
            self.failures.append(f"cannot write {flag} {target} ({reason}), nor a copy under the temp folder ({exc})")
            return None
        logger.warning("cannot write %s %s (%s): kept the result in %s", flag, target, reason, kept)
        self.failures.append(f"cannot write {flag} {target} ({reason}): the result was kept in {kept}")
        return kept

    def finish(self) -> None:
        """CatomeError naming every output that could not be written where asked, and where it was kept."""
        if self.failures:
            raise CatomeError("; ".join(self.failures) + "; copy it from there")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, allow_nan: bool = True) -> None:
    """Indented JSON, atomically; ``allow_nan=False`` refuses NaN and infinities (strict JSON) with a ValueError."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=allow_nan) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
