"""The engine folder on disk: the build lock, atomic install (temp folder, swap, leftovers put back), and the
files in a folder that no build made.

A build works in ``<parent>/.<name>.tmp-<pid>`` beside the target under the lock ``<parent>/.<name>.lock``;
:func:`swap_into_place` installs it (the old folder goes aside to ``.<name>.old-<pid>`` first and is deleted
after), and :func:`recover_leftovers` puts back an old build a crashed swap left aside.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from catome_export.engine.manifest import MANIFEST_FILE, Manifest
from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)


def recover_leftovers(target: Path) -> None:
    """Put back an old build a crashed swap left aside; remove temp folders of dead builds."""
    parent = target.parent
    for path in sorted(parent.glob(f".{target.name}.old-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not target.exists() and (path / MANIFEST_FILE).is_file():
            logger.info("restoring the previous build from %s (a build was interrupted while swapping)", path)
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f".{target.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise CatomeError(f"{target} exists and is not a folder: choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise CatomeError(f"{target} exists and is not an engine folder (no {MANIFEST_FILE}): choose another --out, "
                          "or remove it")


BUILD_FILES = (MANIFEST_FILE, "timing.cache")
"""Files a build writes into the folder besides those its manifest lists."""
_BUILD_NAME = re.compile(r"^(stage_\d+\.(onnx|plan|ort\.onnx)([._-][\w.-]*)?|lora_[\w.-]+)$")
"""Names a build gives its stage files (graphs, external data, TensorRT plans), for a manifest it cannot read."""


def foreign_files(target: Path) -> list[str]:
    """Files in an existing engine folder that no build made: neither listed by its manifest nor written by a
    build beside them (paths relative to the folder, sorted). A rebuild would replace the folder with them."""
    if not target.is_dir():
        return []
    ours = set(BUILD_FILES)
    try:
        manifest: Manifest | None = Manifest.load(target, check_files=False)
    except CatomeError:  # missing, damaged, edited or from another version: judge the stage files by name
        manifest = None
    if manifest is not None:
        ours.update(name for name, _, _ in manifest.files())
    found = []
    for path in sorted(target.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(target).as_posix()
        if rel in ours or (manifest is None and _BUILD_NAME.match(rel)):
            continue
        found.append(rel)
    return found


def check_foreign(target: Path, force: bool) -> None:
    """CatomeError naming the files of someone else's in the engine folder, unless ``force``."""
    found = foreign_files(target)
    if not found:
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    if force:
        logger.warning("--force: the rebuild of %s removes files no build made: %s", target, shown)
        return
    raise CatomeError(f"{target} holds files no build made ({shown}); a rebuild replaces the whole folder: move "
                      "them out, build into another --out, or pass --force to remove them")


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished build in; the old one goes aside first and is deleted after.

    A file-system error on the way (permissions, a folder held open elsewhere) ends in
    :class:`CatomeError` with the old build back in place.
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(target, old)
        except OSError as exc:
            raise CatomeError(f"cannot move the old build {target} aside to install the new one "
                              f"({exc.strerror or exc}): check the permissions of {target.parent} and that no "
                              f"program holds {target} open; {target} was not changed") from None
    try:
        os.rename(tmp, target)
    except BaseException as exc:
        restored = old is None
        if old is not None:
            try:
                os.rename(old, target)
                restored = True
            except OSError:
                pass
        if not isinstance(exc, OSError):
            raise
        where = f"{target} was not changed" if restored else f"the previous build is in {old}: rename it back"
        raise CatomeError(f"cannot move the finished build into {target} ({exc.strerror or exc}): check the "
                          f"permissions of {target.parent}; {where}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def keep_unplaced(tmp: Path, target: Path) -> Path:
    """A finished build that could not be swapped in: renamed to ``<target>.new`` (which no later build
    cleans up), or left where it is when even that fails."""
    kept = target.parent / f"{target.name}.new"
    if kept.exists():
        return tmp
    try:
        os.rename(tmp, kept)
    except OSError:
        return tmp
    return kept


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class BuildLock:
    """An exclusive lock file holding the builder's pid; a lock left by a dead process is taken over.

    Use as a context manager around a build into one engine folder.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                self._create()
            except FileExistsError:
                owner = self._settled_owner()
                if owner is not None and owner != os.getpid() and pid_alive(owner):
                    raise CatomeError(
                        f"another build into {self.what} is running (pid {owner}): wait for it to finish, or, if "
                        f"that process is gone, remove {self.path}"
                    ) from None
                self._remove_stale(owner)
                continue
            except OSError as exc:
                raise CatomeError(f"cannot write the build lock {self.path} ({exc.strerror or exc}): build into a "
                                  "writable folder") from None
            self._held = True
            return
        raise CatomeError(f"cannot take the build lock {self.path}: remove it if no build is running")

    def _create(self) -> None:
        """Make the lock file with our pid already in it (FileExistsError when one exists).

        The pid is written to a private file first and hard-linked into place,
        so no other process ever reads a lock file without its owner (an empty
        one would look stale and be taken over). Where the file system has no
        hard links, the file is created exclusively and written after.
        """
        fd, tmp = tempfile.mkstemp(prefix=f"{self.path.name}.", suffix=".new", dir=self.path.parent)
        try:
            os.chmod(tmp, 0o644)  # other users' builds must read the owner too
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            try:
                os.link(tmp, self.path)
                return
            except FileExistsError:
                raise
            except OSError:
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")

    def _remove_stale(self, owner: int | None) -> None:
        """Remove a lock whose owner is gone, unless another process replaced it with its own meanwhile."""
        grave = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)  # atomic: of two processes taking over, one moves the stale lock
        except FileNotFoundError:
            return
        try:
            moved = int(grave.read_text().strip() or "0")
        except (OSError, ValueError):
            moved = None
        if moved != owner and moved is not None and pid_alive(moved):
            # A live build took the lock between our read and our rename: put its lock back.
            try:
                os.link(grave, self.path)
            except OSError:
                pass
        else:
            logger.info("taking over a stale build lock %s (pid %s is gone)", self.path, owner)
        grave.unlink(missing_ok=True)

    def _settled_owner(self, patience: float = 2.0) -> int | None:
        """The lock's owner; a young lock file without a pid yet is waited on (up to ``patience`` seconds),
        since on a file system without hard links its creator writes the pid just after creating it."""
        deadline = time.monotonic() + patience
        while True:
            owner = self._owner()
            if owner is not None or time.monotonic() >= deadline:
                return owner
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return None  # gone: the caller retries creating it
            if age > patience:
                return None  # an old empty lock: its writer died before writing
            time.sleep(0.02)

    def _owner(self) -> int | None:
        """The pid in the lock file; None when it is missing, empty or unreadable."""
        try:
            return int(self.path.read_text().strip()) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._held:
            if self._owner() == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
