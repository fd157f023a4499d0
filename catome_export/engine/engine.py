"""An engine folder, opened: its manifest read and every file it lists checked, once.

:class:`Engine` is the one engine type that crosses from this package upward: the backends, the runtime,
verify, bench and serve take one (a path is opened where it enters). ``Engine.open`` reads
``manifest.json`` and checks the size and sha256 of every listed file, so opening is the only place a
folder's files are hashed; passing the ``Engine`` on checks nothing again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from catome_export.engine.manifest import Manifest
from catome_export.errors import CatomeError


@dataclass(frozen=True, eq=False)
class Engine:
    """An engine folder whose manifest was read and whose files were checked (:meth:`open`)."""

    path: Path
    """The folder it was opened from (a copy of a build names the copy, not the folder it was built into)."""
    manifest: Manifest
    """Its parsed, checked manifest (``manifest.engine_dir`` is :attr:`path`)."""

    @classmethod
    def open(cls, source: "EngineSource") -> "Engine":
        """The engine folder ``source`` (a path), read and checked: CatomeError naming what is wrong and the
        rebuild command. An ``Engine`` is returned as it is (opened once, checked once)."""
        if isinstance(source, Engine):
            return source
        if not isinstance(source, (str, Path)) or not str(source):
            raise CatomeError(f"expected an engine folder (a path, or an Engine from Engine.open), got "
                              f"{type(source).__name__}: pass the folder catome-export build wrote")
        folder = Path(source)
        return cls(folder, Manifest.load(folder))

    @property
    def name(self) -> str:
        return self.manifest.name

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, {self.manifest.engine_backend}, {len(self.manifest.stages)} stages)"


EngineSource = Union[Engine, str, Path]
"""What the API takes as an engine: an opened :class:`Engine`, or the path of its folder."""
