"""Initializer sizes and external weight files of exported ONNX graphs.

Protobuf cannot serialise one message over 2 GB, so a stage whose weights
come near that size must keep them in a separate file. The decision has to
be made from sizes that do not depend on what the exporter chose to write:
torch's TorchScript exporter, above 2 GB, writes its larger tensors to one
file each, with a ``location`` entry and no ``length``. Sizes here therefore
come from each tensor's dims and data type (exact for every fixed-width
type); a ``length`` entry, where present, is checked against them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from catome_export.errors import CatomeError
from catome_export.fsutil import atomic_open, atomic_write_bytes

logger = logging.getLogger(__name__)

PROTO_LIMIT = 2 ** 31 - 1
"""Protobuf's hard limit on one serialized message."""
PROTO_MARGIN = 64 << 20
"""Head room kept under ``PROTO_LIMIT`` for what the size estimate leaves out (field tags of the tensors)."""
INLINE_SIZE_THRESHOLD = 1024
"""Initializers smaller than this stay inside the graph file when the weights go to an external file."""

_BITS_BY_TYPE_NAME = {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
    "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128,
    "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8,
    "FLOAT8E8M0": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2,
}
"""Storage width of each fixed-width ONNX data type (sub-byte types are packed, rounded up to whole bytes)."""


@functools.cache
def _bits_table() -> dict[int, int]:
    import onnx

    # Names absent from an older onnx are skipped: such a graph cannot hold those types anyway.
    return {getattr(onnx.TensorProto, name): bits for name, bits in _BITS_BY_TYPE_NAME.items()
            if hasattr(onnx.TensorProto, name)}


@dataclass(frozen=True)
class ExternalRef:
    """Where one initializer's data lies outside the graph file (its ``external_data`` entries, parsed)."""

    location: str
    offset: int
    length: int | None
    """The ``length`` entry; None where the writer left it out."""

    @classmethod
    def of(cls, tensor) -> "ExternalRef":
        info = {e.key: e.value for e in tensor.external_data}
        if not info.get("location"):
            raise CatomeError(f"initializer {tensor.name!r} is marked external but names no file: re-export it")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise CatomeError(f"initializer {tensor.name!r} has a malformed external data entry {info}: "
                              "re-export it") from None
        return cls(info["location"], offset, length)

    def path(self, base: Path) -> Path:
        """The file, which must lie inside ``base``."""
        path = (base / self.location).resolve()
        if not path.is_relative_to(base.resolve()):
            raise CatomeError(f"external data location {self.location!r} points outside {base}: re-export it")
        return path


def attribute_tensors(model) -> Iterator:
    """Every tensor outside the main graph's initializers: node attributes (Constant values and the like) and
    the initializers and attributes of subgraphs."""
    def in_graph(graph, top: bool) -> Iterator:
        if not top:
            yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from in_graph(attr.g, False)
                for sub in attr.graphs:
                    yield from in_graph(sub, False)

    yield from in_graph(model.graph, True)


def all_tensors(model) -> Iterator:
    """Every TensorProto of a model that can hold weights: the main graph's initializers, then the rest."""
    yield from model.graph.initializer
    yield from attribute_tensors(model)


def is_external(tensor) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def declared_nbytes(tensor) -> int | None:
    """Bytes of a tensor's data from its dims and data type; None for types without a fixed width (strings)."""
    bits = _bits_table().get(tensor.data_type)
    if bits is None:
        return None
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def tensor_nbytes(tensor, base: Path | None = None) -> int:
    """Bytes of one initializer's data, inline or external, without reading external files.

    External tensors are sized from dims x data type; a ``length`` entry that
    disagrees is an error. Only a variable-width tensor without ``length``
    is sized from its file on disk (which needs ``base``, the graph's folder).
    """
    if not is_external(tensor):
        if tensor.HasField("raw_data"):
            return len(tensor.raw_data)
        size = declared_nbytes(tensor)
        return size if size is not None else tensor.ByteSize()
    ref = ExternalRef.of(tensor)
    size = declared_nbytes(tensor)
    if size is not None:
        if ref.length is not None and ref.length != size:
            raise CatomeError(f"initializer {tensor.name!r}: its external data length {ref.length} differs from "
                              f"its shape {list(tensor.dims)} ({size} bytes): the export is broken, rebuild it")
        return size
    if ref.length is not None:
        return ref.length
    if base is None:
        raise CatomeError(f"initializer {tensor.name!r} has external data of unknown length and no folder to "
                          "size it from")
    return max(0, ref.path(base).stat().st_size - ref.offset)


def weights_bytes(model, base: Path | None = None) -> int:
    """Bytes of all weights of an ONNX model (initializers and tensor attributes), inline or in external files.

    Nothing is loaded: external tensors are sized as :func:`tensor_nbytes` says.
    """
    return sum(tensor_nbytes(t, base) for t in all_tensors(model))


def needs_external_data(model, base: Path | None, threshold: int) -> bool:
    """Whether a model's weights must go to an external file.

    Yes when the exporter already wrote any of them externally (it does so
    only near the 2 GB limit, and loading them back is what fails), when they
    exceed ``threshold``, or when the graph with every weight inline could
    come near protobuf's limit, whatever the threshold.
    """
    if any(is_external(t) for t in all_tensors(model)):
        return True
    weights = weights_bytes(model, base)
    if weights > threshold:
        return True
    return model.ByteSize() > PROTO_LIMIT - PROTO_MARGIN


def _read_external(tensor, base: Path) -> bytes:
    ref = ExternalRef.of(tensor)
    size = tensor_nbytes(tensor, base)
    with open(ref.path(base), "rb") as fh:
        fh.seek(ref.offset)
        data = fh.read(size)
    if len(data) != size:
        raise CatomeError(f"initializer {tensor.name!r}: its external file {ref.location} holds {len(data)} bytes "
                          f"at offset {ref.offset}, {size} expected: the export is incomplete, rebuild it")
    return data


@dataclass(frozen=True)
class WeightsFile:
    """One external weights file as written: its size and sha256 (what the manifest records)."""

    bytes: int
    sha256: str


def gather_weights(model, base: Path, data_path: Path, size_threshold: int = INLINE_SIZE_THRESHOLD, *,
                   consume: bool = False) -> WeightsFile:
    """Move every initializer of ``size_threshold`` bytes or more, and every tensor already external, into the one
    file ``data_path``.

    ``base`` is the folder the model's current external references are
    relative to. Tensors already in external files (initializers or tensor
    attributes) are copied one at a time,
    so the weights are never all in memory at once. The file is written
    beside ``data_path`` under a temporary name, flushed to disk and moved
    into place, and hashed while written. The model's references are
    rewritten to ``data_path.name`` with offset and length.

    ``consume``: ``base`` is a scratch folder (the exporter's per-tensor
    files); each of its files is deleted once the last tensor in it is
    copied, so the weights are on disk once, not twice, while they are gathered.
    """
    import onnx

    data_path = Path(data_path)
    digest = hashlib.sha256()
    offset = 0
    moved = 0
    tensors = [(t, True) for t in model.graph.initializer] + [(t, False) for t in attribute_tensors(model)]
    readers: dict[Path, int] = {}
    if consume:
        for t, _ in tensors:
            if is_external(t):
                source = ExternalRef.of(t).path(base)
                readers[source] = readers.get(source, 0) + 1
    with atomic_open(data_path) as out:
        for t, initializer in tensors:
            if is_external(t):
                data = _read_external(t, base)
                if consume:
                    source = ExternalRef.of(t).path(base)
                    readers[source] -= 1
                    if readers[source] == 0 and source.resolve() != data_path.resolve():
                        source.unlink()
            elif initializer and t.HasField("raw_data") and len(t.raw_data) >= size_threshold:
                data = t.raw_data
            else:
                # Small tensors, and the rare ones in typed fields, stay in the graph file.
                continue
            out.write(data)
            digest.update(data)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)),
                               ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
            moved += 1
    logger.debug("gathered %d initializers (%d bytes) into %s", moved, offset, data_path)
    return WeightsFile(bytes=offset, sha256=digest.hexdigest())


def save_graph(model, path: Path) -> None:
    """Write an ONNX model (weights inline or already external) to ``path`` via a temp file and ``os.replace``.

    Raises a CatomeError, before writing anything, when the message would be
    over protobuf's limit.
    """
    path = Path(path)
    size = model.ByteSize()
    if size > PROTO_LIMIT:
        raise CatomeError(f"{path.name} would be {size / 1e9:.2f} GB, over protobuf's 2 GB limit: its weights "
                          "must go to an external file (lower the external data threshold)")
    atomic_write_bytes(path, model.SerializeToString())
