"""Reading, checking and fusing diffusers-format LoRA files (no engine): the fused weights are diffusers' own."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from catome_export.errors import CatomeError
from catome_export.lora.files import (
    LoraSpec, fuse_into, lora_targets, parse_lora_arg, read_lora, targets_from_config,
)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    save_file(edit(tensors), str(dst), metadata=metadata)
    return dst


def test_parse_lora_arg(lora_files, tmp_path):
    a = lora_files["a"]
    assert parse_lora_arg(str(a)) == LoraSpec(a, 1.0)
    assert parse_lora_arg(f"{a}:0.8") == LoraSpec(a, 0.8)
    assert parse_lora_arg(f"{a}:-1e-1").scale == -0.1
    with pytest.raises(CatomeError, match=r"the scale 'x' is not a finite number"):
        parse_lora_arg(f"{a}:x")
    with pytest.raises(CatomeError, match="does not exist"):
        parse_lora_arg(str(tmp_path / "nope.safetensors"))
    with pytest.raises(CatomeError, match="is a folder"):
        parse_lora_arg(str(tmp_path))
    with pytest.raises(CatomeError, match="names no file"):
        parse_lora_arg(":0.5")
    with pytest.raises(CatomeError, match="finite"):
        parse_lora_arg(f"{a}:inf")
    odd = tmp_path / "with:colon.safetensors"
    odd.write_bytes(a.read_bytes())
    assert parse_lora_arg(str(odd)) == LoraSpec(odd, 1.0)  # a path with ':' whose tail is no number


@pytest.mark.parametrize("name,scale", [("a", 0.7), ("b", 1.0), ("ffconv", 1.3)])
def test_fused_weights_are_diffusers_fuse_lora_bit_for_bit(lora_files, name, scale):
    from catome_export.models.pipeline import tiny_pipeline

    pipe = tiny_pipeline("pndm", with_text_encoder=False)
    ours = copy.deepcopy(pipe.unet)
    pipe.load_lora_weights(str(lora_files[name]))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers
    fuse_into(ours, [LoraSpec(lora_files[name], scale)])
    want, got = pipe.unet.state_dict(), ours.state_dict()
    assert set(want) == set(got)
    changed = [k for k in got if not torch.equal(got[k], load_base()[k])]
    assert changed, "the LoRA changed nothing"
    assert all(torch.equal(want[k], got[k]) for k in want)


_BASE: dict[str, torch.Tensor] = {}


def load_base() -> dict[str, torch.Tensor]:
    if not _BASE:
        from catome_export.models import load_unet

        _BASE.update(load_unet("tiny", weights="random").state_dict())
    return _BASE


def test_two_loras_fuse_in_order(lora_files):
    from catome_export.models import load_unet

    both = load_unet("tiny", weights="random")
    fuse_into(both, [LoraSpec(lora_files["a"], 0.5), LoraSpec(lora_files["b"], 2.0)])
    one = load_unet("tiny", weights="random")
    fuse_into(one, [LoraSpec(lora_files["a"], 0.5)])
    fuse_into(one, [LoraSpec(lora_files["b"], 2.0)])
    assert all(torch.equal(a, b) for a, b in zip(both.state_dict().values(), one.state_dict().values()))


def test_targets_from_config_match_the_model(tiny_unet):
    assert targets_from_config(dict(tiny_unet.config)) == lora_targets(tiny_unet)


def test_read_lora_parses_alpha_from_the_metadata(lora_files):
    lora = read_lora(lora_files["a"])
    assert lora.sha256 and lora.bytes == lora_files["a"].stat().st_size
    entry = next(iter(lora.modules.values()))
    assert entry.rank == 4 and entry.scaling == 8.0 / 4
    assert all(m.endswith(("to_q", "to_k", "to_v", "to_out.0")) for m in lora.modules)


def test_mismatching_key_is_one_line_naming_the_first_key(lora_files, tmp_path, tiny_unet):
    from catome_export.lora.files import check_lora

    targets = lora_targets(tiny_unet)
    renamed = _rewrite(lora_files["a"], tmp_path / "renamed.safetensors", lambda t: {
        k.replace("down_blocks.1.", "down_blocks.7."): v for k, v in t.items()})
    first = sorted(k for k in read_lora(renamed).modules if k.startswith("down_blocks.7."))[0]
    with pytest.raises(CatomeError) as info:
        check_lora(read_lora(renamed), targets)
    assert "\n" not in str(info.value)
    assert f"{first}.lora.down.weight" in str(info.value) and "does not match the model" in str(info.value)

    def widen(t):
        key = sorted(k for k in t if k.endswith("lora.down.weight"))[0]
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 8)
        return t

    wide = _rewrite(lora_files["a"], tmp_path / "wide.safetensors", widen)
    with pytest.raises(CatomeError, match=r"key 'unet\.[^']+\.lora\.down\.weight' does not match the model \(LoRA "):
        check_lora(read_lora(wide), targets)
    garbage = _rewrite(lora_files["a"], tmp_path / "garbage.safetensors",
                       lambda t: {**t, "unet.something.weird": torch.zeros(2)})
    with pytest.raises(CatomeError, match=r"key 'unet.something.weird' does not match the model"):
        read_lora(garbage)
    text = _rewrite(lora_files["a"], tmp_path / "text.safetensors",
                    lambda t: {**t, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                               torch.zeros(4, 32)})
    assert read_lora(text).text_encoder_keys == 1  # left to the pipeline's text encoder
    not_st = tmp_path / "x.safetensors"
    not_st.write_bytes(b"not a safetensors file")
    with pytest.raises(CatomeError, match="is not a safetensors file"):
        read_lora(not_st)
