"""Which initializer of which stage graph holds which U-Net weight (``lora_map.json``), and reading them back.

The TorchScript exporter names a weight it uses as it is after its module path
(``parts.down_blocks__0__resnets__1.conv1.weight``), but a Linear's weight is
folded into a transposed constant with a generated name (``onnx::MatMul_445``),
and ONNX Runtime's fusions pack the query, key and value weights of a
self-attention into one ``[in, 3 * out]`` initializer (``Attention_0_qkv_weight``).
Names therefore cannot be derived; values can. Right after the export a build
hashes every Linear and Conv2d weight of the U-Net as it is and, for matrices,
transposed, and looks every initializer of every stage graph up by its hash
(and, for a matrix that matches nothing, its halves and thirds along the
columns). The map records, per graph file and initializer, the pieces it is
made of: ``[[param, "I" | "T"], ...]`` and the axis they are concatenated on.
An initializer equal to several weights (two identical tensors) is listed under
``ambiguous`` and refit refuses a LoRA that touches one of them.

TensorRT names refittable weights after the ONNX initializers of the graph it
parsed (``stage_<k>.onnx``), so the same map serves its Refitter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catome_export.errors import CatomeError

logger = logging.getLogger(__name__)

MAP_FILE = "lora_map.json"
MAP_FORMAT = 1
SPLITS = (2, 3)
"""Column splits tried for an initializer that matches no weight whole (ONNX Runtime's packed QKV: 3)."""


def _key(shape: Iterable[int], dtype: str, data: bytes) -> tuple[tuple[int, ...], str, str]:
    return tuple(int(d) for d in shape), dtype, hashlib.blake2b(data, digest_size=16).hexdigest()


def _np_dtype_name(arr: np.ndarray) -> str:
    return str(arr.dtype)


def _weight_table(unet: torch.nn.Module) -> dict[tuple[tuple[int, ...], str, str], list[tuple[str, str]]]:
    """Hash key -> [(param, form)] for every Linear and Conv2d weight, as is ("I") and, for matrices, transposed."""
    table: dict[tuple[tuple[int, ...], str, str], list[tuple[str, str]]] = {}
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name, module in modules.items():
        w = module.weight.detach().cpu().contiguous().numpy()
        forms = [("I", w)] + ([("T", np.ascontiguousarray(w.T))] if w.ndim == 2 else [])
        for form, arr in forms:
            table.setdefault(_key(arr.shape, _np_dtype_name(arr), arr.tobytes()), []).append((f"{name}.weight", form))
    return table


def initializer_array(tensor: Any, base: Path) -> np.ndarray:
    """An initializer's value as a numpy array (inline or from its external file)."""
    from onnx import numpy_helper

    from catome_export.export.external_data import _read_external, is_external

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(_read_external(tensor, base), dtype=dtype).reshape(tuple(tensor.dims)).copy()


def build_map(unet: torch.nn.Module, folder: Path, graph_files: Iterable[str]) -> dict[str, Any]:
    """The map of ``graph_files`` (in ``folder``) against ``unet``'s weights (see the module docstring)."""
    import onnx

    table = _weight_table(unet)
    graphs: dict[str, dict[str, Any]] = {}
    ambiguous: set[str] = set()
    found: set[str] = set()
    for file in graph_files:
        model = onnx.load(str(folder / file), load_external_data=False)
        entries: dict[str, Any] = {}
        for t in model.graph.initializer:
            if len(t.dims) < 2 or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                      onnx.TensorProto.BFLOAT16):
                continue
            arr = initializer_array(t, folder)
            hits = table.get(_key(arr.shape, _np_dtype_name(arr), arr.tobytes()))
            if hits:
                if len({p for p, _ in hits}) > 1:
                    ambiguous.update(p for p, _ in hits)
                    continue
                entries[t.name] = {"pieces": [list(hits[0])]}
                found.add(hits[0][0])
                continue
            if arr.ndim != 2:
                continue
            for k in SPLITS:
                if arr.shape[1] % k:
                    continue
                parts = np.split(arr, k, axis=1)
                pieces = [table.get(_key(p.shape, _np_dtype_name(p), np.ascontiguousarray(p).tobytes())) for p in parts]
                if all(h is not None and len({q for q, _ in h}) == 1 for h in pieces):
                    entries[t.name] = {"pieces": [list(h[0]) for h in pieces if h], "axis": 1}
                    found.update(h[0][0] for h in pieces if h)
                    break
        graphs[file] = entries
        del model
    weights = sorted({p for ps in table.values() for p, _ in ps})
    from catome_export.lora.files import lora_targets

    targets = {name: [t.kind, list(t.shape), t.groups] for name, t in lora_targets(unet).items()}
    return {"format": MAP_FORMAT, "graphs": graphs, "ambiguous": sorted(ambiguous),
            "unmapped": [p for p in weights if p not in found and p not in ambiguous], "targets": targets}


def write_map(data: Mapping[str, Any], path: Path) -> None:
    from catome_export.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


@dataclass
class WeightsMap:
    """``lora_map.json`` parsed: per graph file, initializer -> pieces; and the reverse, param -> places."""

    graphs: dict[str, dict[str, dict[str, Any]]]
    ambiguous: frozenset[str] = frozenset()
    unmapped: frozenset[str] = frozenset()
    places: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    """param -> [(graph file, initializer, piece index)]."""
    targets: dict[str, Any] | None = None
    """The U-Net's Linear and Conv2d layers (module path -> Target), what a LoRA is checked against."""

    @classmethod
    def load(cls, path: Path) -> "WeightsMap":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CatomeError(f"cannot read the engine's weights map {path} ({exc}): rebuild the engine") from None
        if not isinstance(data, dict) or data.get("format") != MAP_FORMAT:
            raise CatomeError(f"{path} is not a weights map this version reads: rebuild the engine")
        from catome_export.lora.files import Target

        targets = data.get("targets")
        out = cls(graphs=data["graphs"], ambiguous=frozenset(data.get("ambiguous") or ()),
                  unmapped=frozenset(data.get("unmapped") or ()),
                  targets=None if targets is None else {k: Target(str(v[0]), tuple(int(d) for d in v[1]), int(v[2]))
                                                        for k, v in targets.items()})
        for file, entries in out.graphs.items():
            for name, entry in entries.items():
                for i, (param, _) in enumerate(entry["pieces"]):
                    out.places.setdefault(param, []).append((file, name, i))
        return out

    def check_params(self, params: Iterable[str], graph_files: Iterable[str], what: str) -> None:
        """CatomeError unless every param is found in one of ``graph_files`` (the ones the engine runs)."""
        files = set(graph_files)
        for p in params:
            if p in self.ambiguous:
                raise CatomeError(f"{what} changes {p}, whose values the engine's graphs share with another weight "
                                  "(identical tensors): fuse it at build time instead (catome-export build --lora)")
            if not any(f in files for f, _, _ in self.places.get(p, ())):
                raise CatomeError(f"{what} changes {p}, which the engine's graphs do not hold as a plain weight "
                                  "(folded into another constant by the export): fuse it at build time instead "
                                  "(catome-export build --lora)")

    def group(self, params: Iterable[str], graph_files: Iterable[str]) -> set[str]:
        """``params`` and every param packed with one of them in an initializer of ``graph_files``."""
        files = set(graph_files)
        out = set(params)
        todo = list(out)
        while todo:
            p = todo.pop()
            for file, name, _ in self.places.get(p, ()):
                if file not in files:
                    continue
                for q, _ in self.graphs[file][name]["pieces"]:
                    if q not in out:
                        out.add(q)
                        todo.append(q)
        return out

    def source(self, param: str, graph_files: Iterable[str]) -> tuple[str, str, str]:
        """(graph file, initializer, form) where ``param`` lies whole (a one-piece initializer)."""
        files = list(graph_files)
        for file, name, _ in self.places.get(param, ()):
            entry = self.graphs[file][name]
            if file in files and len(entry["pieces"]) == 1:
                return file, name, entry["pieces"][0][1]
        raise CatomeError(f"the engine's graphs hold {param} only packed with other weights: rebuild the engine")

    def initializers(self, file: str, values: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """New values of the initializers of ``file`` made of params in ``values`` (each piece's param must be
        in ``values``: see :meth:`group`), in the graph's layout."""
        out: dict[str, np.ndarray] = {}
        for name, entry in self.graphs.get(file, {}).items():
            pieces = entry["pieces"]
            if not any(p in values for p, _ in pieces):
                continue
            arrays = []
            for p, form in pieces:
                if p not in values:
                    raise CatomeError(f"internal: {name} in {file} packs {p}, whose new value is missing")
                a = values[p].detach().cpu().contiguous().numpy()
                arrays.append(np.ascontiguousarray(a.T) if form == "T" else a)
            out[name] = arrays[0] if len(arrays) == 1 else np.ascontiguousarray(
                np.concatenate(arrays, axis=int(entry.get("axis", 1))))
        return out


def read_params(folder: Path, wmap: WeightsMap, params: Iterable[str], graph_files: Iterable[str]
                ) -> dict[str, torch.Tensor]:
    """The values ``params`` have in the stage graphs ``graph_files`` (torch layout), each graph read once."""
    import onnx

    wanted: dict[str, list[tuple[str, str, str]]] = {}
    for p in params:
        file, name, form = wmap.source(p, graph_files)
        wanted.setdefault(file, []).append((p, name, form))
    out: dict[str, torch.Tensor] = {}
    for file, items in wanted.items():
        model = onnx.load(str(folder / file), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        for p, name, form in items:
            if name not in inits:
                raise CatomeError(f"{file} has no initializer {name} (the weights map does not fit the graph): "
                                  "rebuild the engine")
            arr = initializer_array(inits[name], folder)
            out[p] = torch.from_numpy(np.ascontiguousarray(arr.T) if form == "T" else np.array(arr))
        del model, inits
    return out
