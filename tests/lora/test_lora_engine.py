"""LoRA with the engine on the tiny model (ONNX Runtime): fused at build, swapped by refit, back to none bit for bit.

Three engines are built once for the module (128 px, batch 1..2): ``base``
(no LoRA), ``a`` (LoRA a at scale 0.8, fused at build and verified) and ``b``
(LoRA b at scale 1.2). Tests that refit work on copies.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from catome_export.cli.rebuild import build_command, error_line
from catome_export.errors import CatomeError

SCALE_A, SCALE_B = 0.8, 1.2
STEPS = 4


def _build(folder: Path, lora: list[str], verify: bool = False) -> Path:
    from catome_export.workflows.build import build_engine

    build_engine("tiny", backend="ort", resolution=128, min_batch=1, max_batch=2, out_dir=folder, verify=verify,
                 verify_steps=3, lora=lora)
    return folder


@pytest.fixture(scope="module")
def lora_engines(tmp_path_factory, lora_files) -> dict[str, Path]:
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("lora-engines")
    return {
        "base": _build(root / "base", []),
        "a": _build(root / "a", [f"{lora_files['a']}:{SCALE_A}"], verify=True),
        "b": _build(root / "b", [f"{lora_files['b']}:{SCALE_B}"]),
    }


def _copy(folder: Path, tmp_path: Path, name: str = "engine") -> Path:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _outputs(runtime, smooth_latents, text_embeddings) -> list[torch.Tensor]:
    """Three U-Net calls (a checkpoint step, then cached plans) on fixed inputs."""
    runtime.reset()
    sample, text = smooth_latents(2, (16, 16)), text_embeddings(2)
    return [runtime.unet(sample, torch.tensor(t), encoder_hidden_states=text).sample.clone()
            for t in (901, 501, 101)]


def _load(folder: Path):
    from catome_export.runtime import Runtime

    return Runtime.load(folder, backend="ort-cpu")


def _run(folder: Path, smooth_latents, text_embeddings) -> list[torch.Tensor]:
    with _load(folder) as runtime:
        return _outputs(runtime, smooth_latents, text_embeddings)


def _equal(xs, ys) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_build_records_the_lora_and_verifies(lora_engines, lora_files):
    from catome_export.engine.manifest import Manifest

    m = Manifest.load(lora_engines["a"])
    assert m.lora is not None and [(Path(e.source), e.scale) for e in m.lora.active] == [(lora_files["a"], SCALE_A)]
    entry = m.lora.active[0]
    assert entry.sha256 == hashlib.sha256(lora_files["a"].read_bytes()).hexdigest()
    assert (lora_engines["a"] / entry.file).read_bytes() == lora_files["a"].read_bytes()  # the engine keeps a copy
    assert m.lora.built_with[0].sha256 == entry.sha256 and m.lora.base is not None and m.lora.overrides is None
    assert f"--lora {lora_files['a']}:{SCALE_A:g}" in build_command(m.rebuild_options())
    assert m.build is not None and m.build.lora == (f"{lora_files['a']}:{SCALE_A:g}",)
    base = Manifest.load(lora_engines["base"])
    assert base.lora is not None and base.lora.active == () and base.lora.weights_map is not None
    assert m.model.weights_hash == base.model.weights_hash  # the base weights' hash: the LoRA is recorded apart


def test_old_manifest_without_lora_section_loads_and_refit_names_the_rebuild(lora_engines, tmp_path):
    import json

    from catome_export.engine.manifest import MANIFEST_FILE, Manifest, canonical_hash
    from catome_export.lora.refit import refit_engine

    folder = _copy(lora_engines["base"], tmp_path)
    data = json.loads((folder / MANIFEST_FILE).read_text())
    del data["lora"]
    data["manifest_sha256"] = canonical_hash(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    (folder / "lora_map.json").unlink()
    assert Manifest.load(folder).lora is None
    with pytest.raises(CatomeError, match="built before LoRA refit existed.*rebuild it with catome-export build"):
        refit_engine(folder, "none")


def test_engine_with_lora_fused_at_build_matches_eager_fuse_lora(lora_engines, lora_files, smooth_latents,
                                                                  text_embeddings):
    """The pipeline with the engine == the pipeline with diffusers' load_lora_weights + fuse_lora and eager
    CA-ToMe: final latents within the verify tolerance."""
    from catome_export.models.pipeline import tiny_pipeline
    from factories import engine_against_eager

    pipe = tiny_pipeline("pndm", with_text_encoder=False)
    pipe.load_lora_weights(str(lora_files["a"]))
    pipe.fuse_lora(lora_scale=SCALE_A)
    pipe.unload_lora_weights()
    cond, uncond = text_embeddings(1, seed=1), text_embeddings(1, seed=2)

    def generate():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, height=128,
                    width=128, latents=smooth_latents(1, (16, 16)), guidance_scale=7.5, output_type="latent").images

    with _load(lora_engines["a"]) as runtime:
        _, want, merged = engine_against_eager(pipe, runtime, generate)
    assert any(r > 0 for m in merged for r in m.values())
    base = tiny_pipeline("pndm", with_text_encoder=False)
    plain = base(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, height=128, width=128,
                 latents=smooth_latents(1, (16, 16)), guidance_scale=7.5, output_type="latent").images
    assert (plain - want).abs().max() > 1e-2  # the LoRA really changes the result


def test_refit_to_another_lora_equals_a_fresh_build_and_back_to_none_is_the_base(lora_engines, lora_files, tmp_path,
                                                                                  smooth_latents, text_embeddings):
    from catome_export.cli.main import main
    from catome_export.engine.manifest import Manifest
    from catome_export.runtime.verify import verify_engine

    folder = _copy(lora_engines["a"], tmp_path)
    assert main(["refit", "--engine", str(folder), "--lora", f"{lora_files['b']}:{SCALE_B}"]) == 0
    m = Manifest.load(folder)
    assert [(Path(e.source), e.scale) for e in m.lora.active] == [(lora_files["b"], SCALE_B)]
    command = build_command(m.rebuild_options())  # rebuilds what the engine computes now: b, not the build's a
    assert f"--lora {lora_files['b']}:{SCALE_B:g}" in command and str(lora_files["a"]) not in command
    assert m.build is not None and m.build.lora == (f"{lora_files['a']}:{SCALE_A:g}",)  # how it was built
    assert m.lora.overrides is not None and not any(p.name.startswith(".") for p in folder.iterdir())
    fresh = _run(lora_engines["b"], smooth_latents, text_embeddings)
    refit = _run(folder, smooth_latents, text_embeddings)
    assert _equal(refit, fresh)  # the very initializers a build with b exports: bit for bit
    report = verify_engine(folder, steps=3, backend="ort-cpu")  # the eager reference gets b fused too
    assert report.ok, report.summary()
    assert main(["refit", "--engine", str(folder), "--none"]) == 0
    m = Manifest.load(folder)
    assert m.lora.active == () and m.lora.overrides is not None  # the graphs hold a: the base comes back as overrides
    assert _equal(_run(folder, smooth_latents, text_embeddings), _run(lora_engines["base"], smooth_latents,
                                                                      text_embeddings))


def test_base_engine_refit_to_a_lora_and_back_to_none_bit_for_bit(lora_engines, lora_files, tmp_path, smooth_latents,
                                                                  text_embeddings):
    from catome_export.cli.main import main
    from catome_export.engine.manifest import Manifest

    folder = _copy(lora_engines["base"], tmp_path)
    before = _snapshot(folder)
    base = _run(folder, smooth_latents, text_embeddings)
    assert main(["refit", "--engine", str(folder), "--lora", f"{lora_files['a']}:{SCALE_A}"]) == 0
    assert _equal(_run(folder, smooth_latents, text_embeddings), _run(lora_engines["a"], smooth_latents, text_embeddings))
    assert main(["refit", "--engine", str(folder), "--none"]) == 0
    m = Manifest.load(folder)
    assert m.lora.active == () and m.lora.overrides is None
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # the same files: the base engine
    assert _equal(_run(folder, smooth_latents, text_embeddings), base)


def test_set_lora_swaps_in_memory_without_touching_the_folder(lora_engines, lora_files, smooth_latents, text_embeddings):
    folder = lora_engines["base"]
    before = _snapshot(folder)
    with _load(folder) as runtime:
        base = _outputs(runtime, smooth_latents, text_embeddings)
        assert runtime.set_lora(f"{lora_files['a']}:{SCALE_A}") == f"a.safetensors:{SCALE_A:g}"
        with_a = _outputs(runtime, smooth_latents, text_embeddings)
        runtime.set_lora([(lora_files["b"], SCALE_B)])
        with_b = _outputs(runtime, smooth_latents, text_embeddings)
        with pytest.raises(CatomeError, match="does not exist"):
            runtime.set_lora("missing.safetensors")
        assert _equal(_outputs(runtime, smooth_latents, text_embeddings), with_b)  # a failed swap changes nothing
        assert runtime.set_lora(None) == "none"
        back = _outputs(runtime, smooth_latents, text_embeddings)
    assert _equal(with_a, _run(lora_engines["a"], smooth_latents, text_embeddings))
    assert _equal(with_b, _run(lora_engines["b"], smooth_latents, text_embeddings))
    assert _equal(back, base)
    assert _snapshot(folder) == before


def test_set_lora_save_refits_the_folder(lora_engines, lora_files, tmp_path, smooth_latents, text_embeddings):
    from catome_export.engine.manifest import Manifest

    folder = _copy(lora_engines["base"], tmp_path)
    with _load(folder) as runtime:
        runtime.set_lora(f"{lora_files['b']}:{SCALE_B}", save=True)
        swapped = _outputs(runtime, smooth_latents, text_embeddings)
    assert Manifest.load(folder).lora.describe() == f"b.safetensors:{SCALE_B:g}"
    assert _equal(_run(folder, smooth_latents, text_embeddings), swapped)


def test_key_mismatch_is_one_line_before_any_change(lora_engines, lora_files, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from catome_export.cli.main import main

    with safe_open(str(lora_files["a"]), "pt") as fh:
        tensors = {k.replace("up_blocks.1.", "up_blocks.9."): fh.get_tensor(k) for k in fh.keys()}
    bad = tmp_path / "other-model.safetensors"
    save_file(tensors, str(bad))
    first = sorted(k for k in tensors if "up_blocks.9." in k)[0]
    folder = _copy(lora_engines["base"], tmp_path)
    before = _snapshot(folder)
    capsys.readouterr()
    assert main(["refit", "--engine", str(folder), "--lora", f"{bad}:0.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"key {first!r} does not match the model" in err
    assert _snapshot(folder) == before
    out = tmp_path / "never"
    assert main(["build", "--model", "tiny", "--lora", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"key {first!r} does not match the model" in err and not out.exists()
    assert main(["build", "--model", "tiny", "--lora", f"{lora_files['a']}:half", "--out", str(out)]) == 1
    assert "is not a finite number" in capsys.readouterr().err and not out.exists()
    with _load(folder) as runtime:
        with pytest.raises(CatomeError, match="does not match the model"):
            runtime.set_lora(str(bad))
        assert runtime.lora == "none"


def test_refit_failure_leaves_the_engine_unchanged(lora_engines, lora_files, tmp_path, monkeypatch, smooth_latents,
                                                   text_embeddings):
    from catome_export.lora import refit as refit_module

    folder = _copy(lora_engines["a"], tmp_path)
    before = _snapshot(folder)
    outputs = _run(folder, smooth_latents, text_embeddings)
    with pytest.raises(CatomeError, match="test hook"):
        refit_module.refit_engine(folder, f"{lora_files['b']}:{SCALE_B}", _fail_after_write=True)
    assert _snapshot(folder) == before

    def broken_copy(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(refit_module, "_copy_loras", broken_copy)
    with pytest.raises(OSError):
        refit_module.refit_engine(folder, f"{lora_files['b']}:{SCALE_B}")  # after the overrides file was written
    assert _snapshot(folder) == before
    assert _equal(_run(folder, smooth_latents, text_embeddings), outputs)


def test_damaged_overrides_file_is_refused_with_the_rebuild(lora_engines, lora_files, tmp_path):
    from catome_export.engine.manifest import Manifest
    from catome_export.lora.refit import refit_engine

    folder = _copy(lora_engines["base"], tmp_path)
    m = refit_engine(folder, f"{lora_files['a']}:{SCALE_A}")
    path = folder / m.lora.overrides.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CatomeError, match="does not match its sha256"):
        Manifest.load(folder)
    with pytest.raises(CatomeError, match=f"{m.lora.overrides.file} does not match its sha256.*rebuild it with") \
            as err:
        refit_engine(folder, None)  # a refit checks every file it reads before it writes anything
    # built without a LoRA, refit to a: the rebuild fuses a, the LoRA the engine computes
    assert m.build is not None and m.build.lora == ()
    assert f"--lora {lora_files['a']}:{SCALE_A:g} " in error_line(err.value)
