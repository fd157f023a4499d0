"""``Runtime.from_parts``: a runtime over ready stage runners still has a manifest and a backend."""

from __future__ import annotations

import pytest

from catome_export.errors import CatomeError
from catome_export.merging import MergeSettings, parse_schedule


def test_a_runtime_from_parts_has_a_manifest_and_a_backend(make_runtime, tiny_unet, tiny_sites):
    settings = MergeSettings(threshold=0.7, schedule=parse_schedule("config3"))
    runtime = make_runtime(settings)  # Runtime.from_parts over the tiny stages on the torch backend
    assert runtime.backend.name == "torch" and runtime.manifest is not None
    m = runtime.manifest
    assert [s.spec for s in m.stages] == runtime.chain.specs and m.sites == tuple(tiny_sites)
    assert m.merge == settings and m.model.id == "" and m.model.unet_config == dict(tiny_unet.config)
    assert (m.shapes.opt_height, m.shapes.opt_width) == (tiny_unet.config.sample_size,) * 2
    assert runtime.lora == "none" and "torch on cpu" in repr(runtime)


def test_the_stand_in_backend_loads_nothing(make_runtime):
    from catome_export.runtime.runtime import PartsBackend, Runtime

    runtime = make_runtime(MergeSettings())
    bare = Runtime.from_parts(list(runtime.chain.runners), list(runtime.sites.values()), runtime.settings,
                              unet_config={}, dtype=runtime.dtype, device="cpu")
    assert isinstance(bare.backend, PartsBackend) and bare.backend.name == "custom"
    with pytest.raises(CatomeError, match="loads no stage files: load an engine folder with Runtime.load"):
        bare.backend.load_stage(None, runtime.manifest.stages[0])  # type: ignore[arg-type]
    with pytest.raises(CatomeError, match="set_lora needs a runtime loaded from an engine folder"):
        bare.set_lora("none")
