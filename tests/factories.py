"""Real :class:`Manifest` objects for tests, built from its typed parts (no stand-in classes).

``make_manifest()`` gives a small, valid manifest (one merge site, two stages,
the tiny model's shapes); keyword arguments replace any part. ``make_stages``
makes stage records from stage specs (``cut_unet``'s, or hand-written ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from catome_export.engine.controlnet import ControlNetRecord
from catome_export.engine.manifest import BuildRecord, EngineFile, Manifest, ModelRecord, StageRecord, TrtRecord
from catome_export.engine.shapes import ShapeRanges
from catome_export.engine.specs import StageSpec, TensorSpec
from catome_export.export.stages import plan_specs
from catome_export.merging import MergeSettings, parse_schedule
from catome_export.models.sites import MergeSite

SITE_PATH = "down_blocks.0.attentions.0.transformer_blocks.0"


def make_shapes(batch: tuple[int, int] = (1, 2), latent: tuple[int, int] = (8, 8), *,
                latent_width: tuple[int, int] | None = None, opt_batch: int | None = None,
                opt_latent: tuple[int, int] | None = None, merge_fraction: float | None = 0.5,
                text_len: int = 77, text_dim: int = 32) -> ShapeRanges:
    """Shape ranges as a build records them (opt: the largest batch, the given or the largest latent size)."""
    width = latent_width or latent
    oh, ow = opt_latent or (latent[1], width[1])
    shapes = ShapeRanges(batch=batch, latent_height=latent, latent_width=width, text_len=(text_len, text_len),
                         opt_batch=batch[1] if opt_batch is None else opt_batch, opt_height=oh, opt_width=ow,
                         opt_text_len=text_len, opt_merge_fraction=merge_fraction, text_dim=text_dim)
    shapes.validate()
    return shapes


def site_stage_specs(num_sites: int = 1, channels: int = 8, text_dim: int = 32) -> list[StageSpec]:
    """A chain of ``num_sites + 1`` hand-written stage specs in the project's IO convention."""
    x = lambda k: TensorSpec(f"x{k}", "float32", ("B", f"N{k}", channels))  # noqa: E731
    sample = TensorSpec("sample", "float32", ("B", 4, "H", "W"))
    timestep = TensorSpec("timestep", "float32", ("B",))
    text = TensorSpec("encoder_hidden_states", "float32", ("B", "L", text_dim))
    noise = TensorSpec("noise_pred", "float32", ("B", 4, "H", "W"))
    specs = [StageSpec(0, None, 0, (sample, timestep), (x(0),))]
    for k in range(num_sites):
        last = k == num_sites - 1
        specs.append(StageSpec(k + 1, k, None if last else k + 1, (x(k), *plan_specs(k), text),
                               (noise,) if last else (x(k + 1),)))
    return specs


def make_stages(specs: Iterable[StageSpec], *, engines: bool = False) -> tuple[StageRecord, ...]:
    """Stage records for ``specs`` (file ``stage_<k>.onnx``; a ``stage_<k>.plan`` engine with ``engines``)."""
    return tuple(StageRecord(spec=s, file=f"stage_{s.index}.onnx",
                             engine=EngineFile(f"stage_{s.index}.plan") if engines else None) for s in specs)


def make_trt(**fields: Any) -> TrtRecord:
    """A ``trt`` record of an H100 build (fields override)."""
    values: dict[str, Any] = {"version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                              "plugins": ("ScatterElements(reduction=add)",), "opt_merge_fraction": 0.75}
    values.update(fields)
    return TrtRecord(**values)


def make_manifest(*, name: str = "tiny", model: str = "tiny", weights: str = "random",
                  weights_hash: str | None = "0" * 64, unet_config: dict[str, Any] | None = None,
                  precision: str = "fp32", merge: MergeSettings | None = None,
                  sites: Sequence[MergeSite] | None = None, shapes: ShapeRanges | None = None,
                  stages: Sequence[StageRecord] | None = None, trt: TrtRecord | None = None,
                  build: BuildRecord | None = None, controlnet: ControlNetRecord | None = None,
                  **extra: Any) -> Manifest:
    """A real Manifest from its parts; ``trt`` given: a TensorRT build (every stage gets a plan)."""
    sites = tuple(sites) if sites is not None else (MergeSite(0, SITE_PATH, 1, channels=8),)
    if stages is None:
        stages = make_stages(site_stage_specs(len(sites)), engines=trt is not None)
    return Manifest(
        name=name,
        model=ModelRecord(id=model, weights=weights, weights_hash=weights_hash, unet_config=dict(unet_config or {})),
        precision=precision,
        merge=merge or MergeSettings(threshold=0.7, schedule=parse_schedule("config3")),
        sites=sites, shapes=shapes or make_shapes(), stages=tuple(stages),
        engine_backend="trt" if trt is not None else "ort", trt=trt, tools={}, controlnet=controlnet, build=build,
        extra=extra,
    )


def engine_against_eager(pipe: Any, runtime: Any, generate: Any) -> tuple[Any, Any, list[dict[int, int]]]:
    """``generate()`` twice on ``pipe``: with eager CA-ToMe at the runtime's settings (the reference), then with the
    runtime attached as its U-Net; asserts the final latents agree within verify's tolerance and r per site is the
    same at every step. Returns the engine's and eager's latents and the engine's r per site per step."""
    import torch

    from catome_export.eager import apply_merging

    with apply_merging(pipe, runtime.settings) as handle:
        want = generate()
        eager_merged = [s.merged for s in handle.history]
    with runtime.attach(pipe):
        got = generate()
        merged = [s.merged for s in runtime.history]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
    assert merged == eager_merged
    return got, want, merged
