"""Single-file checkpoints: written in the original layout from the tiny models, read back bit for bit; bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catome_export.choices import Weights
from catome_export.errors import CatomeError
from catome_export.models import load_unet, model_info, weights_hash
from catome_export.models.checkpoint import fingerprint_of_config
from catome_export.models.registry import MODELS, bundled_config, resolve_source
from checkpoints import (
    ldm_clip_state_dict, ldm_open_clip_state_dict, ldm_unet_state_dict, ldm_vae_state_dict, write_checkpoint,
)


def _perturbed(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded changes to every weight, so a loader that fell back to the seeded random init would differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return unet


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    unet = _perturbed(load_unet("tiny", "random"), 1)
    path = tmp_path_factory.mktemp("ckpt") / "my-finetune.safetensors"
    return write_checkpoint(path, ldm_unet_state_dict(unet)), unet


@pytest.fixture(scope="module")
def tiny_xl_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    unet = _perturbed(load_unet("tiny-xl", "random"), 2)
    path = tmp_path_factory.mktemp("ckpt") / "xl.safetensors"
    return write_checkpoint(path, ldm_unet_state_dict(unet)), unet


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("which", ["tiny", "tiny-xl"])
def test_an_original_layout_file_loads_back_bit_for_bit(which, tiny_file, tiny_xl_file):
    path, unet = tiny_file if which == "tiny" else tiny_xl_file
    loaded = load_unet(which, weights=str(path))
    _assert_same(loaded, unet)
    assert weights_hash(loaded) == weights_hash(unet) != weights_hash(load_unet(which, "random"))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_a_ckpt_file_with_a_state_dict_key_loads_the_same(tiny_file, tmp_path):
    path, unet = tiny_file
    ckpt = write_checkpoint(tmp_path / "same.ckpt", ldm_unet_state_dict(unet))
    _assert_same(load_unet("tiny", weights=ckpt), unet)


def test_a_diffusers_unet_weights_file_loads_as_well(tiny_file, tmp_path):
    _, unet = tiny_file
    path = write_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors", dict(unet.state_dict()))
    _assert_same(load_unet("tiny", weights=path), unet)


def test_a_fp16_file_loads_in_the_dtype_asked_for(tiny_file, tmp_path):
    _, unet = tiny_file
    half = {k: v.half() for k, v in ldm_unet_state_dict(unet).items()}
    path = write_checkpoint(tmp_path / "half.safetensors", half)
    loaded = load_unet("tiny", weights=path, dtype="fp32")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight.half().float())
    assert load_unet("tiny", weights=path, dtype="fp16").conv_in.weight.dtype == torch.float16


def test_the_architecture_of_a_file_given_as_the_model_is_detected(tiny_file, tiny_xl_file):
    for (path, _), name in ((tiny_file, "tiny"), (tiny_xl_file, "tiny-xl")):
        assert resolve_source(str(path)) == (name, path.resolve())
        assert model_info(str(path)) == MODELS[name]
        _assert_same(load_unet(str(path)), load_unet(name, weights=path))
    assert resolve_source("tiny", "random") == ("tiny", Weights.RANDOM)


def test_the_registry_architectures_have_distinct_fingerprints():
    prints = {name: fingerprint_of_config(bundled_config(name)) for name in MODELS}
    assert len(set(prints.values())) == len(MODELS)
    sd15, sd21, sdxl = prints["sd15"], prints["sd21"], prints["sdxl"]
    assert (sd15.width, sd15.text_dim, sd15.linear_projection, sd15.added_dim) == (320, 768, False, None)
    assert (sd21.text_dim, sd21.linear_projection) == (1024, True)
    assert (sdxl.text_dim, sdxl.added_dim) == (2048, 2816)


# -- wrong files: one line that says what was found and what to do ------------------------
def test_a_file_of_another_architecture_names_the_right_one(tiny_xl_file):
    path, _ = tiny_xl_file
    with pytest.raises(CatomeError) as info:
        load_unet("tiny", weights=path)
    message = str(info.value)
    assert "does not fit tiny" in message and "added conditioning" in message
    assert f"--model tiny-xl --weights {path.resolve()}" in message and "\n" not in message


def test_an_sdxl_size_file_given_as_sd15_is_refused_before_loading(tiny_xl_file):
    path, _ = tiny_xl_file
    with pytest.raises(CatomeError, match="does not fit sd15.*text width 64.*text width 768"):
        resolve_source("sd15", str(path))


def test_a_truncated_file_is_named_so(tiny_file, tmp_path):
    path, _ = tiny_file
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CatomeError, match="truncated.*download it again"):
        load_unet("tiny", weights=cut)
    cut_ckpt = tmp_path / "cut.ckpt"
    write_checkpoint(tmp_path / "whole.ckpt", {"model.diffusion_model.x": torch.zeros(1000)})
    cut_ckpt.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:500])
    with pytest.raises(CatomeError, match="not a readable .ckpt file"):
        load_unet("tiny", weights=cut_ckpt)


def test_a_file_missing_weights_is_refused(tiny_file, tmp_path):
    _, unet = tiny_file
    state = ldm_unet_state_dict(unet)
    state.pop("model.diffusion_model.out.2.weight")
    path = write_checkpoint(tmp_path / "partial.safetensors", state)
    with pytest.raises(CatomeError, match="1 weights missing.*conv_out.weight"):
        load_unet("tiny", weights=path)


def test_a_lora_file_is_named_a_lora(tmp_path):
    path = write_checkpoint(tmp_path / "style.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)})
    for call in (lambda: load_unet("tiny", weights=path), lambda: load_unet(str(path))):
        with pytest.raises(CatomeError, match="is a LoRA .*full checkpoint of the base model"):
            call()


def test_files_without_a_unet_say_what_they_hold(tmp_path):
    from catome_export.models.pipeline import tiny_vae

    vae = write_checkpoint(tmp_path / "vae.safetensors", ldm_vae_state_dict(tiny_vae()))
    with pytest.raises(CatomeError, match="holds a VAE only"):
        load_unet("tiny", weights=vae)
    other = write_checkpoint(tmp_path / "other.safetensors", {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(CatomeError, match="no Stable Diffusion U-Net .*fc.weight"):
        load_unet(str(other))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CatomeError, match="not a readable .ckpt file"):
        load_unet("tiny", weights=text)


def test_a_pickle_with_python_objects_is_not_executed(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callbacks": Path("x")}, path)
    with pytest.raises(CatomeError, match="Python objects besides tensors"):
        load_unet("tiny", weights=path)


@pytest.mark.parametrize("model,weights,message", [
    ("tiny", "/no/such/model.safetensors", "no such file"),
    ("tiny", "model.bin", r"weights must be one of pretrained, random, or a single-file checkpoint"),
    ("/no/such/model.safetensors", None, "--model '/no/such/model.safetensors': no such file"),
])
def test_bad_paths_are_one_line_errors(model, weights, message):
    with pytest.raises(CatomeError, match=message):
        resolve_source(model, weights)


def test_a_checkpoint_model_with_other_weights_is_refused(tiny_file):
    path, _ = tiny_file
    with pytest.raises(CatomeError, match="holds the weights: leave out --weights"):
        resolve_source(str(path), "random")
    assert resolve_source(str(path), "pretrained") == ("tiny", path.resolve())


def test_build_options_from_a_checkpoint(tiny_file, tmp_path):
    from catome_export.engine.options import BuildOptions

    path, _ = tiny_file
    for given in ({"model": str(path)}, {"model": "tiny", "weights": str(path)}):
        opts = BuildOptions.create(given["model"], weights=given.get("weights"), out_dir=tmp_path / "e")
        assert (opts.model, opts.weights, opts.name) == ("tiny", path.resolve(), "my-finetune")
    assert BuildOptions.create("tiny").weights == Weights.RANDOM and BuildOptions.create("tiny").name == "tiny"


def test_a_pipeline_takes_unet_vae_and_text_encoder_from_one_file(tmp_path):
    from catome_export.models.pipeline import tiny_pipeline
    from catome_export.workflows.generate import load_pipeline

    source = tiny_pipeline(seed=5)  # other seeded weights than the bundled pipeline (seed 0) in every part
    _perturbed(source.unet, 3)
    state = {**ldm_unet_state_dict(source.unet), **ldm_vae_state_dict(source.vae),
             **ldm_clip_state_dict(source.text_encoder)}
    path = write_checkpoint(tmp_path / "full.safetensors", state)
    pipe = load_pipeline(str(path), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(getattr(pipe, name), getattr(source, name))
    unet_only = write_checkpoint(tmp_path / "unet-only.safetensors", ldm_unet_state_dict(source.unet))
    pipe = load_pipeline("tiny", weights=str(unet_only), device="cpu")
    _assert_same(pipe.unet, source.unet)
    _assert_same(pipe.vae, tiny_pipeline().vae)  # the file has no VAE: the model's own stays


def test_an_sdxl_layout_file_fills_both_text_encoders(tmp_path):
    """SDXL's file: CLIP ViT-L under conditioner.embedders.0.transformer, OpenCLIP under conditioner.embedders.1.model."""
    from catome_export.models.pipeline import tiny_xl_pipeline
    from catome_export.workflows.generate import load_pipeline

    source = tiny_xl_pipeline(seed=7)
    state = {**ldm_unet_state_dict(source.unet), **ldm_vae_state_dict(source.vae),
             **ldm_clip_state_dict(source.text_encoder, "conditioner.embedders.0.transformer."),
             **ldm_open_clip_state_dict(source.text_encoder_2, "conditioner.embedders.1.model.")}
    pipe = load_pipeline(str(write_checkpoint(tmp_path / "xl.safetensors", state)), device="cpu")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same(getattr(pipe, name), getattr(source, name))


def test_an_sd2_layout_text_encoder_is_read_from_its_openclip_keys(tmp_path):
    """SD 2.x files keep the text encoder in OpenCLIP's layout under cond_stage_model.model (q, k, v in one)."""
    from catome_export.models.pipeline import tiny_pipeline
    from catome_export.workflows.generate import load_pipeline

    source = tiny_pipeline(seed=9)
    state = {**ldm_unet_state_dict(source.unet),
             **ldm_open_clip_state_dict(source.text_encoder, "cond_stage_model.model.")}
    pipe = load_pipeline("tiny", weights=str(write_checkpoint(tmp_path / "sd2.safetensors", state)), device="cpu")
    _assert_same(pipe.text_encoder, source.text_encoder)


def test_an_engine_whose_checkpoint_moved_says_so(tiny_file, tmp_path):
    from catome_export.backends.torch_backend import load_reference_unet
    from factories import make_manifest

    path, unet = tiny_file
    manifest = make_manifest(model="tiny", weights=str(path), weights_hash=weights_hash(unet))
    assert weights_hash(load_reference_unet(manifest)) == weights_hash(unet)
    gone = make_manifest(model="tiny", weights=str(tmp_path / "moved.safetensors"))
    with pytest.raises(CatomeError, match="built from the checkpoint .*moved.safetensors, which is not there any more"):
        load_reference_unet(gone)
