"""The eager patch taken apart by someone else: the next call is refused, and the history records no merge.

After ``apply_catome``, ``pipe.enable_attention_slicing()``, ``unet.set_attn_processor(...)`` or
``unet.fuse_qkv_projections()`` replace the merging attention processors, and clearing a module's hooks
removes the merge hooks; merging would silently be off while the history still reported r per site.
"""

from __future__ import annotations

import pytest
import torch

from catome_export import apply_catome
from catome_export.errors import CatomeError

LATENT = (16, 16)


@pytest.fixture
def inputs(smooth_latents, text_embeddings):
    return smooth_latents(2, LATENT, seed=0), text_embeddings(2, seed=1)


def _call(unet, inputs, t: float = 900.0) -> torch.Tensor:
    x, emb = inputs
    with torch.no_grad():
        return unet(x, torch.tensor(t), emb).sample


def _merging_then(unet, inputs, tamper, match: str) -> None:
    handle = apply_catome(unet, threshold=0.7, schedule="every_step", step_base=0)
    try:
        _call(unet, inputs)
        assert any(r > 0 for r in handle.history[-1].merged.values())  # merging really ran before
        before = [(s.step, dict(s.merged)) for s in handle.history]
        tamper(unet)
        with pytest.raises(CatomeError, match=match):
            _call(unet, inputs, t=800.0)
        assert [(s.step, dict(s.merged)) for s in handle.history] == before  # no record of a merge that did not run
    finally:
        handle.remove()


def test_set_attn_processor_after_apply_is_refused(fresh_tiny_unet, inputs):
    from diffusers.models.attention_processor import AttnProcessor

    _merging_then(fresh_tiny_unet, inputs, lambda u: u.set_attn_processor(AttnProcessor()),
                  r"processors of .*attn1 \(now AttnProcessor\).* were replaced.*handle.remove\(\)")


def test_fuse_qkv_projections_after_apply_is_refused(fresh_tiny_unet, inputs):
    if not hasattr(fresh_tiny_unet, "fuse_qkv_projections"):
        pytest.skip("this diffusers has no fuse_qkv_projections")
    _merging_then(fresh_tiny_unet, inputs, lambda u: u.fuse_qkv_projections(), "were replaced")


@pytest.mark.parametrize("where", ["unet", "block"])
def test_removed_merge_hooks_are_refused(fresh_tiny_unet, inputs, where):
    from catome_export.models import find_merge_sites

    def clear(unet) -> None:
        module = unet if where == "unet" else unet.get_submodule(find_merge_sites(unet)[0].path)
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()

    _merging_then(fresh_tiny_unet, inputs, clear, "merge hooks on .* were removed")


def test_attention_slicing_on_the_pipeline_is_refused_and_reapplying_works(tiny_unet):
    import copy

    from catome_export.models.pipeline import tiny_pipeline

    pipe = tiny_pipeline(unet=copy.deepcopy(tiny_unet))

    def run():
        return pipe("a red car", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    handle = apply_catome(pipe, threshold=0.5, schedule="every_step")
    try:
        run()
        assert handle.history and any(r > 0 for s in handle.history for r in s.merged.values())
        pipe.enable_attention_slicing()
        with pytest.raises(CatomeError, match="were replaced"):
            run()
        assert handle.history == []  # the call's reset ran, then the call was refused before any step
    finally:
        handle.remove()
    handle = apply_catome(pipe, threshold=0.5, schedule="every_step")  # applied after the change: merges again
    try:
        run()
        assert any(r > 0 for s in handle.history for r in s.merged.values())
    finally:
        handle.remove()
