"""Fusing LoRAs at build, and swapping them in a built engine without a re-export (refit).

The stage graphs keep the weights the build exported: the base U-Net's, or
with ``build --lora`` the fused ones, whose base values the build saved in
``lora_base.safetensors``. A refit computes, in torch, the new value of every
weight whose value changes (base + the new LoRAs' deltas, with the same
float operations as the build's fusion, so a refit to a LoRA gives the very
initializers a build with it exports) and records every weight whose active
value differs from the graphs' in one safetensors file (``lora_weights_<sha>``):

* ONNX Runtime builds its sessions from the same graph files with those
  initializers replaced (``SessionOptions.add_initializer``): no re-export,
  no re-trace. A refit back to the graphs' own LoRA (none, for a base build)
  writes no file, so the sessions are the base engine's, bit for bit;
* TensorRT plans built ``--refittable`` get the new weights through the
  Refitter (``set_named_weights`` under the ONNX initializer names, then
  ``refit_cuda_engine``) and are written back under new names.

On disk a refit holds the build lock of the folder, writes every new file
under a name no current file has, then replaces ``manifest.json`` atomically
(the only step that changes what a load sees), and removes the files only the
old manifest listed. A failure before the manifest is replaced removes what it
wrote and leaves the engine as it was.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catome_export.errors import CatomeError
from catome_export.engine.manifest import EngineFile, LoraEntry, LoraRecord, Manifest
from catome_export.engine.folder import BuildLock
from catome_export.fsutil import atomic_write_bytes, sha256_file
from catome_export.lora.files import (
    LoraFile, LoraSpec, fused_weights, load_loras, lora_targets, parse_lora_arg, targets_from_config, touched_params,
)
from catome_export.lora.weights import MAP_FILE, WeightsMap, build_map, read_params, write_map

logger = logging.getLogger(__name__)

BASE_FILE = "lora_base.safetensors"
Progress = Callable[[str], None]


def copy_name(sha256: str) -> str:
    """The name of a LoRA file's copy in an engine folder."""
    return f"lora_{sha256[:12]}.safetensors"


def resolve_specs(loras: Any) -> tuple[LoraSpec, ...]:
    """``None``, ``"none"``, ``[]``: no LoRA; a ``"FILE[:SCALE]"``, a LoraSpec, a (file, scale) pair, or a list."""
    if loras is None or (isinstance(loras, str) and loras.strip().lower() == "none"):
        return ()
    if isinstance(loras, (str, Path, LoraSpec)) or (isinstance(loras, tuple) and len(loras) == 2
                                                    and isinstance(loras[1], (int, float))
                                                    and not isinstance(loras[1], bool)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, tuple) and len(item) == 2:
            item = LoraSpec(Path(item[0]), item[1])
        elif isinstance(item, Path):
            item = str(item)
        out.append(parse_lora_arg(item))
    return tuple(out)


def _save_tensors(values: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in sorted(values.items())})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_new(folder: Path, name: str, data: bytes, written: list[Path]) -> EngineFile:
    path = folder / name
    if not path.exists():
        atomic_write_bytes(path, data)
        written.append(path)
    import hashlib

    return EngineFile(file=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _copy_loras(loras: Sequence[tuple[LoraSpec, LoraFile]], folder: Path, written: list[Path]
                ) -> tuple[LoraEntry, ...]:
    entries = []
    for spec, lora in loras:
        name = copy_name(lora.sha256)
        target = folder / name
        if not target.exists() or sha256_file(target) != lora.sha256:
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(lora.path, tmp)
            tmp.replace(target)
            written.append(target)
        entries.append(LoraEntry(source=str(spec.path), sha256=lora.sha256, scale=spec.scale, file=name,
                                 bytes=lora.bytes))
    return tuple(entries)


# -- build ------------------------------------------------------------------------------------------------------
@dataclass
class BuildLoras:
    """What a build with ``--lora`` fused and kept."""

    entries: tuple[LoraEntry, ...]
    base: EngineFile | None


def fuse_for_build(unet: torch.nn.Module, specs: Sequence[LoraSpec], folder: Path) -> BuildLoras:
    """Fuse ``specs`` into ``unet`` in place, writing the touched weights' base values (``lora_base.safetensors``)
    and a copy of each LoRA file into ``folder``."""
    targets = lora_targets(unet)
    loras = load_loras(specs, targets)
    params = dict(unet.named_parameters())
    base = {p: params[p].detach().clone() for p in touched_params(loras)}
    fused = fused_weights(base, loras, targets)
    written: list[Path] = []
    base_file = _write_new(folder, BASE_FILE, _save_tensors(base), written)
    entries = _copy_loras(loras, folder, written)
    with torch.no_grad():
        for name, value in fused.items():
            params[name].copy_(value)
    return BuildLoras(entries, base_file)


def lora_record(unet: torch.nn.Module, folder: Path, graph_files: Sequence[str], built: BuildLoras | None, *,
                refittable: bool = False) -> LoraRecord:
    """The manifest's ``lora`` section of a fresh build: the weights map of its graphs, and its LoRAs."""
    wmap = build_map(unet, folder, graph_files)
    write_map(wmap, folder / MAP_FILE)
    path = folder / MAP_FILE
    record = EngineFile(file=MAP_FILE, sha256=sha256_file(path), bytes=path.stat().st_size)
    entries = built.entries if built is not None else ()
    return LoraRecord(active=entries, built_with=tuple(replace(e, file=None, bytes=None) for e in entries),
                      weights_map=record, base=built.base if built is not None else None, refittable=refittable)


# -- refit ------------------------------------------------------------------------------------------------------
def engine_graph_files(manifest: Manifest) -> tuple[list[str], list[str]]:
    """(the standard stage graphs, every graph file of the engine)."""
    std = [s.file for s in manifest.stages]
    fused = [s.ort_optimized.file for s in manifest.stages if s.ort_optimized is not None]
    return std, std + fused


def require_lora_record(manifest: Manifest) -> LoraRecord:
    record = manifest.lora
    if record is None or record.weights_map is None:
        raise manifest.rebuild_needed(f"engine {manifest.engine_dir or manifest.name} was built before LoRA refit "
                                      "existed (its manifest has no weights map)")
    return record


@dataclass
class RefitPlan:
    """A refit worked out, nothing written: the new LoRAs and every weight value that changes."""

    manifest: Manifest
    loras: list[tuple[LoraSpec, LoraFile]]
    overrides: dict[str, torch.Tensor]
    """Every weight whose new active value differs from the graphs' (with the weights packed beside them)."""
    changed: set[str]
    """Weights whose active value changes with this refit."""
    active: dict[str, torch.Tensor] = field(default_factory=dict)
    """New active value of every weight that was or will be different from the graphs'."""
    wmap: WeightsMap | None = None
    previous: dict[str, torch.Tensor] = field(default_factory=dict)
    """The active value before this refit of every weight in ``changed``."""

    @property
    def same(self) -> bool:
        return not self.changed

    def describe(self) -> str:
        return " + ".join(f"{s.path.name}:{s.scale:g}" for s, _ in self.loras) or "none"


def plan_refit(engine_dir: Path, manifest: Manifest, specs: Sequence[LoraSpec],
               current: Mapping[str, torch.Tensor] | None = None) -> RefitPlan:
    """Work out a refit of ``engine_dir`` to ``specs`` (CatomeError on a LoRA that does not fit, before anything
    changes). ``current``: the weights that differ from the graphs now (default: the manifest's overrides file;
    a runtime swapped in memory passes its own)."""
    record = require_lora_record(manifest)
    assert record.weights_map is not None
    wmap = WeightsMap.load(engine_dir / record.weights_map.file)
    targets = wmap.targets if wmap.targets is not None else targets_from_config(manifest.model.unet_config)
    loras = load_loras(specs, targets)
    std, every = engine_graph_files(manifest)
    for spec, lora in loras:
        wmap.check_params([m.param for m in lora.modules.values()], std, f"LoRA {spec.path}")
    saved_base = _load_tensors(engine_dir / record.base.file) if record.base is not None else {}
    if current is not None:
        old = dict(current)
    else:
        old = _load_tensors(engine_dir / record.overrides.file) if record.overrides is not None else {}
    touched = touched_params(loras)
    wmap.check_params(saved_base, std, "the LoRA fused at build")
    params = set(touched) | set(saved_base) | set(old)
    graph = read_params(engine_dir, wmap, sorted(params), std)
    base = {p: saved_base.get(p, graph[p]) for p in params}
    fused = fused_weights(base, loras, {m: targets[m] for m in targets})
    active = {p: fused.get(p, base[p]) for p in params}
    overrides = {p: v for p, v in active.items() if not torch.equal(v, graph[p])}
    changed = {p for p in params if not torch.equal(active[p], old.get(p, graph[p]))}
    packed = wmap.group(overrides, every) - set(overrides)
    if packed:
        extra = read_params(engine_dir, wmap, sorted(packed), std)
        overrides.update(extra)  # not overridden: their active value is the graphs' own
    previous = {p: old.get(p, graph[p]) for p in changed}
    return RefitPlan(manifest=manifest, loras=loras, overrides=overrides, changed=changed, active=active, wmap=wmap,
                     previous=previous)


def _check_inputs(engine_dir: Path, manifest: Manifest, record: LoraRecord) -> None:
    """The sha256 of every file a refit reads whole (the weights map, the base and overrides files, the standard
    stage graphs; the external weights files, of which it reads only the weights it changes, and the fused
    graphs, which it does not read, are checked by every load)."""
    files = [f for f in (record.weights_map, record.base, record.overrides) if f is not None]
    files += [EngineFile(s.file, s.sha256, s.bytes) for s in manifest.stages]
    for f in files:
        if f.sha256 and sha256_file(engine_dir / f.file) != f.sha256:
            raise manifest.rebuild_needed(f"engine {engine_dir}: {f.file} does not match its sha256 in the manifest "
                                          "(damaged or replaced)", engine_dir=engine_dir)


def overrides_name(data: bytes) -> str:
    import hashlib

    return f"lora_weights_{hashlib.sha256(data).hexdigest()[:12]}.safetensors"


def refit_engine(engine_dir: str | Path, loras: Any, progress: Progress | None = None, *,
                 _fail_after_write: bool = False) -> Manifest:
    """Swap the engine's LoRA on disk (see the module docstring); returns the new manifest.

    ``loras``: what :func:`resolve_specs` takes (None or ``"none"``: back to the base weights)."""
    say = progress or logger.info
    engine_dir = Path(engine_dir)
    specs = resolve_specs(loras)
    require_lora_record(Manifest.load(engine_dir, check_files=False))
    with BuildLock(engine_dir.parent / f".{engine_dir.name}.lock", str(engine_dir)):
        # as it is now that the folder is ours; sizes checked, hashes left to every load (which checks them all)
        manifest = Manifest.load(engine_dir, check_hashes=False)
        record = require_lora_record(manifest)
        _check_inputs(engine_dir, manifest, record)
        plan = plan_refit(engine_dir, manifest, specs)
        say(f"refit {engine_dir}: LoRA {record.describe()} -> {plan.describe()} ({len(plan.changed)} weights "
            f"change, {len(plan.overrides)} differ from the graphs)")
        if manifest.engine_backend == "trt" and not record.refittable and plan.changed:
            raise manifest.rebuild_needed(f"the TensorRT plans of {engine_dir} were built without --refittable",
                                          ": rebuild with", engine_dir=engine_dir,
                                          overrides={"refittable": True})
        old_files = {name for name, _, _ in manifest.files()}
        written: list[Path] = []
        try:
            overrides = None
            if plan.overrides:
                data = _save_tensors(plan.overrides)
                overrides = _write_new(engine_dir, overrides_name(data), data, written)
            entries = _copy_loras(plan.loras, engine_dir, written)
            stages = manifest.stages
            if manifest.engine_backend == "trt" and plan.changed and not record.stripped:
                from catome_export.lora.trt_refit import refit_plans

                stages = refit_plans(engine_dir, manifest, plan, written, say)
            new = replace(manifest, stages=stages, lora=replace(record, active=entries, overrides=overrides),
                          manifest_sha256="", created=manifest.created)
            if _fail_after_write:
                raise CatomeError("refit stopped on request (test hook) before the manifest was replaced")
            new.save(engine_dir)  # the commit point
        except BaseException:
            for path in written:
                if path.name not in old_files:
                    path.unlink(missing_ok=True)
            raise
        keep = {name for name, _, _ in new.files()}
        for name in old_files - keep:
            (engine_dir / name).unlink(missing_ok=True)
    say(f"engine {engine_dir} now computes LoRA {new.lora.describe() if new.lora else 'none'}")
    return new


# -- loading -------------------------------------------------------------------------------------------------------
class InitializerOverrides:
    """The active weights of an engine whose LoRA differs from its graphs', by graph file (ONNX Runtime)."""

    def __init__(self, wmap: WeightsMap, values: Mapping[str, torch.Tensor]) -> None:
        self.wmap = wmap
        self.values = dict(values)

    @classmethod
    def of(cls, engine_dir: Path, manifest: Manifest) -> "InitializerOverrides | None":
        record = manifest.lora
        if record is None or record.overrides is None or record.weights_map is None:
            return None
        return cls(WeightsMap.load(engine_dir / record.weights_map.file),
                   _load_tensors(engine_dir / record.overrides.file))

    def for_file(self, file: str) -> dict[str, np.ndarray]:
        return self.wmap.initializers(file, self.values)

    def files_touched(self, params: Iterable[str]) -> set[str]:
        wanted = set(params)
        return {f for p in wanted for f, _, _ in self.wmap.places.get(p, ())}


def active_loras(manifest: Manifest, engine_dir: Path) -> list[tuple[LoraSpec, LoraFile]]:
    """The LoRAs an engine computes, read from their copies in the folder (for an eager reference)."""
    from catome_export.lora.files import read_lora

    record = manifest.lora
    if record is None:
        return []
    out = []
    for e in record.active:
        if not e.file:
            raise CatomeError(f"engine {engine_dir}: the LoRA {e.source} has no copy in the folder: refit it again")
        lora = read_lora(engine_dir / e.file)
        out.append((LoraSpec(engine_dir / e.file, e.scale), lora))
    return out


def fuse_active(unet: torch.nn.Module, manifest: Manifest, engine_dir: Path) -> None:
    """Fuse the engine's active LoRAs into an eager U-Net of its base weights (verify's reference)."""
    loras = active_loras(manifest, engine_dir)
    if not loras:
        return
    targets = lora_targets(unet)
    params = dict(unet.named_parameters())
    base = {p: params[p].detach() for p in touched_params(loras)}
    fused = fused_weights(base, loras, targets)
    with torch.no_grad():
        for name, value in fused.items():
            params[name].copy_(value)


# -- a loaded runtime -------------------------------------------------------------------------------------------
def apply_to_runtime(runtime: Any, loras: Any, *, save: bool = False) -> str:
    """``Runtime.set_lora``: swap the LoRA of a loaded engine in place (and on disk with ``save``: the folder is
    refit first, atomically, then the loaded engine); returns the new LoRA's description. A LoRA that does not
    fit, or a failed refit of the folder, changes nothing; the loaded engine changes only once all its new
    sessions exist (ONNX Runtime) or gets its previous weights back (TensorRT)."""
    engine_dir, manifest = runtime.engine_dir, runtime.manifest
    if engine_dir is None:
        raise CatomeError("set_lora needs a runtime loaded from an engine folder (Runtime.load)")
    specs = resolve_specs(loras)
    backend = runtime.backend
    name = str(getattr(backend, "name", ""))
    kind = "ort" if name.startswith("ort") else "trt" if name == "trt" and hasattr(backend, "refit_stage") else None
    if kind is None:
        raise CatomeError(f"set_lora swaps weights on ONNX Runtime and TensorRT; this runtime runs on "
                          f"{getattr(backend, 'name', 'a custom backend')}: refit the folder (catome-export refit) "
                          "and load it again")
    current = getattr(runtime, "_lora_overrides", None)
    plan = plan_refit(Path(engine_dir), manifest, specs, current)
    assert plan.wmap is not None
    if save:
        runtime.manifest = refit_engine(engine_dir, specs)
    if plan.changed:
        std, every = engine_graph_files(manifest)
        if kind == "ort":
            _swap_ort(runtime, plan)
        else:
            _refit_trt(runtime, plan)
    runtime._lora_overrides = plan.overrides
    entries = tuple(LoraEntry(source=str(s.path), sha256=f.sha256, scale=s.scale) for s, f in plan.loras)
    runtime._lora_active = entries
    return plan.describe()


def _refit_trt(runtime: Any, plan: RefitPlan) -> None:
    """Refit the loaded TensorRT engines whose weights change; on a failure, the ones already refit get their
    previous weights back before the error is raised."""
    assert plan.wmap is not None
    backend, manifest = runtime.backend, runtime.manifest
    new = {p: plan.active[p] for p in plan.changed}
    old = {p: plan.previous[p] for p in plan.changed}
    done = []
    graphs = runtime._graphs
    try:
        for runner in runtime.chain.runners:
            weights = plan.wmap.initializers(manifest.stages[runner.spec.index].file, new)
            if weights:
                backend.refit_stage(runner, weights)
                done.append(runner)
    except BaseException:
        for runner in done:
            try:
                backend.refit_stage(runner, plan.wmap.initializers(manifest.stages[runner.spec.index].file, old))
            except CatomeError:
                logger.error("could not put the previous weights back into %s", runner.path.name)
        raise
    if done:
        runtime.replace_runners({})  # drops CUDA graphs captured with the old weights
    del graphs


def _swap_ort(runtime: Any, plan: RefitPlan) -> None:
    """New ONNX Runtime sessions, from the same graph files, for the stages whose weights change; swapped in once
    all are made."""
    from catome_export.backends.ort import stage_graph_file

    assert plan.wmap is not None
    backend, manifest = runtime.backend, runtime.manifest
    new_overrides = InitializerOverrides(plan.wmap, plan.overrides) if plan.overrides else None
    files = {f for p in plan.changed for f, _, _ in plan.wmap.places.get(p, ())}
    stages = [s for s in manifest.stages if stage_graph_file(s, backend.options) in files]
    old_setting = backend.initializer_overrides
    made = []
    try:
        backend.initializer_overrides = new_overrides
        for stage in stages:
            made.append(backend.load_stage(Path(runtime.engine_dir), stage))
    except BaseException:
        for runner in made:
            runner.close()
        backend.initializer_overrides = old_setting
        raise
    runtime.replace_runners({r.spec.index: r for r in made})
