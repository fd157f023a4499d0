"""Model registry and merge sites: tiny/sd15 configs, seeded random weights, offline errors, dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.models import MODELS, bundled_config, find_merge_sites, load_unet, model_info, weights_hash
from catome_export.models import registry

TINY_SITES = [
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "down_blocks.0.attentions.1.transformer_blocks.0",
    "up_blocks.3.attentions.0.transformer_blocks.0",
    "up_blocks.3.attentions.1.transformer_blocks.0",
    "up_blocks.3.attentions.2.transformer_blocks.0",
]


@pytest.mark.slow
def test_random_weights_are_identical_across_processes(tiny_unet):
    code = "from catome_export.models import load_unet, weights_hash; print(weights_hash(load_unet('tiny', 'random')))"
    env = {**os.environ, "PYTHONHASHSEED": "7"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == weights_hash(tiny_unet)


def test_random_weights_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_unet("tiny", "random")
    assert torch.equal(torch.rand(3), expected)


def test_weights_hash_sees_a_changed_weight(fresh_tiny_unet):
    before = weights_hash(fresh_tiny_unet)
    with torch.no_grad():
        fresh_tiny_unet.conv_in.bias[0] += 1e-3
    assert weights_hash(fresh_tiny_unet) != before


def test_tiny_sites(tiny_unet):
    sites = find_merge_sites(tiny_unet)
    assert [s.path for s in sites] == TINY_SITES
    assert [s.index for s in sites] == list(range(5))
    assert all(s.downsample == 1 for s in sites)
    assert sites[0].grid((32, 32)) == (32, 32) and sites[0].grid((7, 9)) == (7, 9)


def test_sites_at_lower_levels(tiny_unet):
    sites = find_merge_sites(tiny_unet, max_downsample=2)
    assert len(sites) > 5
    assert {s.downsample for s in sites} == {1, 2}
    two = [s for s in sites if s.downsample == 2][0]
    assert two.grid((32, 32)) == (16, 16) and two.grid((9, 7)) == (5, 4)  # ceil division
    paths = [s.path for s in sites]
    assert paths.index(TINY_SITES[1]) < paths.index("down_blocks.1.attentions.0.transformer_blocks.0")


def test_site_errors(tiny_unet):
    with pytest.raises(CatomeError, match="max_downsample"):
        find_merge_sites(tiny_unet, max_downsample=3)
    with pytest.raises(CatomeError, match="UNet2DConditionModel"):
        find_merge_sites(torch.nn.Linear(2, 2))


def test_unknown_model_names_what_to_use(tmp_path):
    with pytest.raises(CatomeError, match="'tiny', 'tiny-xl', 'sd15', 'sd21', 'sdxl', or a local diffusers folder"):
        load_unet("sd99", "random")
    with pytest.raises(CatomeError, match="local diffusers folder"):
        load_unet(str(tmp_path), "pretrained")
    with pytest.raises(CatomeError, match="weights must be"):
        load_unet("tiny", "imagenet")
    with pytest.raises(CatomeError, match="no bundled config"):
        bundled_config("sd99")


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_pretrained_offline_names_weights_random(monkeypatch, name):
    from diffusers import UNet2DConditionModel

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this model")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", offline)
    with pytest.raises(CatomeError, match="--weights random") as info:
        load_unet(name, "pretrained")
    assert registry.HUB_IDS[name] in str(info.value)


def test_sd15_random_uses_the_bundled_architecture(monkeypatch):
    """Building the full SD 1.5 U-Net takes long; check the config it is built from instead."""
    seen = {}

    def fake_random_unet(config, seed=0):
        seen["config"] = config
        return _Stub()

    monkeypatch.setattr(registry, "random_unet", fake_random_unet)
    load_unet("sd15", "random")
    cfg = seen["config"]
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280] and cfg["cross_attention_dim"] == 768
    assert MODELS["sd15"].text_dim == 768 and MODELS["sd15"].default_resolution == 512


class _Stub(torch.nn.Module):
    dtype = torch.float32


@pytest.mark.parametrize("dtype,expected", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                            (torch.float16, torch.float16), ("float32", torch.float32)])
def test_dtypes(dtype, expected):
    unet = load_unet("tiny", "random", dtype=dtype)
    assert unet.dtype == expected
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_bad_dtype():
    with pytest.raises(CatomeError, match="fp32, fp16 or bf16"):
        load_unet("tiny", "random", dtype="int8")


def test_local_folder_round_trip(tmp_path, tiny_unet):
    folder = tmp_path / "pipe" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(tiny_unet.config)))
    info = model_info(str(tmp_path / "pipe"))
    assert info.text_dim == 32 and info.default_resolution == 256
    unet = load_unet(str(tmp_path / "pipe"), "random")
    assert weights_hash(unet) == weights_hash(tiny_unet)
    with pytest.raises(CatomeError, match="--weights random"):
        load_unet(str(tmp_path / "pipe"), "pretrained")  # config only, no weight files


def test_model_info_of_names():
    assert model_info("tiny").text_dim == 32 and model_info("tiny").default_resolution == 256
