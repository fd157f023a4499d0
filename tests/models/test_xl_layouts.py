"""SDXL and SD 2.x layouts: registry entries, per-model merge levels, depth > 1, linear proj_in, bad models.

The full-size U-Nets (SDXL: 2.57e9 parameters, 10 GB in fp32) are built on
the meta device: modules and shapes without memory, enough for the merge
sites, which depend on the module tree only.
"""

from __future__ import annotations

import json

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.models import MODELS, bundled_config, default_merge_level, find_merge_sites, load_unet, model_info
from catome_export.models.registry import added_conditioning_dims, top_attention_level

TINY_XL_SITES = [
    f"{block}.attentions.{a}.transformer_blocks.{t}"
    for block, n_attn in (("down_blocks.1", 2), ("up_blocks.1", 3)) for a in range(n_attn) for t in range(2)
]


def meta_unet(name: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(bundled_config(name))


@pytest.fixture(scope="module")
def tiny_xl():
    return load_unet("tiny-xl", "random")


@pytest.fixture(scope="module")
def sdxl_meta():
    return meta_unet("sdxl")


def test_sdxl_real_config_has_no_merge_site_at_the_authors_default_level(sdxl_meta):
    """With max_downsample = 1 (the authors' default) merging would do nothing on SDXL: the level must follow
    the model."""
    with pytest.raises(CatomeError, match=r"no transformer block at downsample <= 1.*use max_downsample=2"):
        find_merge_sites(sdxl_meta, max_downsample=1)
    sites = find_merge_sites(sdxl_meta, max_downsample=MODELS["sdxl"].max_downsample)
    assert MODELS["sdxl"].max_downsample == 2 == default_merge_level(sdxl_meta)
    # depth 2 in down_blocks.1 (2 Transformer2DModels) and up_blocks.1 (3): 10 self-attention blocks
    assert [s.path for s in sites] == TINY_XL_SITES
    assert all(s.downsample == 2 for s in sites) and sites[0].grid((128, 128)) == (64, 64)


def test_sdxl_real_config_is_sdxl_base(sdxl_meta):
    assert sum(p.numel() for p in sdxl_meta.parameters()) == 2_567_463_684
    assert [len(a.transformer_blocks) for a in sdxl_meta.down_blocks[2].attentions] == [10, 10]
    assert isinstance(sdxl_meta.down_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    assert sdxl_meta.add_embedding.linear_1.in_features == 1280 + 6 * 256
    info = MODELS["sdxl"]
    assert (info.text_dim, info.text_embeds_dim, info.time_ids_dim) == (2048, 1280, 6)
    assert info.default_resolution == 1024 and info.added_conditioning and info.prediction_type == "epsilon"


def test_sd21_real_config():
    unet = meta_unet("sd21")
    sites = find_merge_sites(unet, MODELS["sd21"].max_downsample)
    assert len(sites) == 5 and default_merge_level(unet) == 1
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.down_blocks[:3]]
    assert heads == [5, 10, 20]  # attention heads per level, 64 channels each
    info = MODELS["sd21"]
    assert (info.text_dim, info.default_resolution, info.prediction_type) == (1024, 768, "v_prediction")
    assert not info.added_conditioning and info.max_downsample == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_entries_match_their_bundled_configs(name):
    cfg = bundled_config(name)
    info = MODELS[name]
    assert info.max_downsample == top_attention_level(cfg)
    assert info.text_dim == cfg["cross_attention_dim"]
    assert info.default_resolution == cfg["sample_size"] * 8
    added = added_conditioning_dims(cfg)
    assert (info.text_embeds_dim, info.time_ids_dim) == (added if added else (None, None))


def test_tiny_xl_layout(tiny_xl):
    sites = find_merge_sites(tiny_xl, MODELS["tiny-xl"].max_downsample)
    assert [s.path for s in sites] == TINY_XL_SITES
    assert [s.index for s in sites] == list(range(10))
    assert not any(True for name, _ in tiny_xl.down_blocks[0].named_modules() if "attentions" in name)
    assert isinstance(tiny_xl.up_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    with pytest.raises(CatomeError, match="use max_downsample=2"):
        find_merge_sites(tiny_xl, max_downsample=1)
    x = torch.randn(1, 4, 16, 16)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    out = tiny_xl(x, 5, encoder_hidden_states=torch.randn(1, 77, 64), added_cond_kwargs=added).sample
    assert out.shape == x.shape


def test_local_sdxl_style_folder_derives_its_entry(tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "scheduler").mkdir()
    (pipe / "unet" / "config.json").write_text(json.dumps(bundled_config("tiny-xl")))
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    info = model_info(str(pipe))
    assert (info.max_downsample, info.text_dim, info.text_embeds_dim, info.time_ids_dim) == (2, 64, 32, 6)
    assert info.prediction_type == "v_prediction"
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "flow"}))
    with pytest.raises(CatomeError, match="prediction_type 'flow'"):
        model_info(str(pipe))


def test_transformer_based_model_is_refused_with_what_to_do(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", "num_layers": 2}))
    with pytest.raises(CatomeError, match="SD3Transformer2DModel, not a UNet2DConditionModel"):
        load_unet(str(folder), "random")
    with pytest.raises(CatomeError, match="not a UNet2DConditionModel"):
        model_info(str(folder))

    class DiT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(CatomeError, match="DiT, not a diffusers UNet2DConditionModel.*transformer-based"):
        find_merge_sites(DiT())
    with pytest.raises(CatomeError, match="not a diffusers UNet2DConditionModel"):
        default_merge_level(DiT())


def test_inconsistent_text_time_config_is_refused():
    with pytest.raises(CatomeError, match="inconsistent"):
        added_conditioning_dims({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 10,
                                 "addition_time_embed_dim": 8})
    with pytest.raises(CatomeError, match="no attention in any down block"):
        top_attention_level({"down_block_types": ["DownBlock2D"]})
