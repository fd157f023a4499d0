"""Embed a CA-ToMe engine in a diffusers pipeline, end to end on the bundled tiny model (runs offline, on a CPU).

1. build the tiny model's engine into a temporary folder with the build API;
2. load it (TensorRT where it runs, else ONNX Runtime) and attach it to the
   offline tiny StableDiffusionPipeline: ``pipe(...)`` now runs the engine,
   each call starting at step 0 with empty merge caches;
3. generate, print the merged tokens per site at every step, detach;
4. drive the same runtime from a hand-written denoising loop with
   ``runtime.set_step(i)``.

    python examples/embed_pipeline.py --out out/embedded.png

The tiny model's text encoder and VAE are small random stand-ins: the image is
noise-shaped whatever the prompt. For SD 1.5 build with ``--model sd15`` and
load the pipeline with ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from catome_export.workflows.build import build_engine
from catome_export.workflows.generate import save_png
from catome_export.models.pipeline import tiny_pipeline
from catome_export.runtime import Runtime
from catome_export.runtime.embed import attach


def custom_loop(pipe, runtime: Runtime, prompt: str, steps: int, size: int, seed: int) -> torch.Tensor:
    """A minimal classifier-free-guidance loop that numbers the engine's steps itself."""
    cond, uncond = pipe.encode_prompt(prompt, runtime.device, 1, True)
    text = torch.cat([uncond, cond]).to(runtime.dtype)
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    latents = (latents * pipe.scheduler.init_noise_sigma).to(runtime.device, runtime.dtype)
    for i, t in enumerate(pipe.scheduler.timesteps):
        runtime.set_step(i)  # step 0 also starts a new generation (empty caches)
        model_in = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = runtime.unet(model_in, t, text).sample
        noise_uncond, noise_text = noise.chunk(2)
        latents = pipe.scheduler.step(noise_uncond + 7.5 * (noise_text - noise_uncond), t, latents).prev_sample
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="A high-quality photograph of a lighthouse.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the engine is built for it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/embedded.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = Path(tmp) / "tiny"
        print(f"building the tiny engine for {args.size}x{args.size} into {engine_dir} ...")
        build_engine("tiny", resolution=args.size, out_dir=engine_dir, verify=False)

        with Runtime.load(engine_dir) as runtime:
            print(runtime)
            pipe = tiny_pipeline()
            with attach(pipe, runtime) as attached:
                image = pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                             generator=torch.Generator().manual_seed(args.seed)).images[0]
                for record in attached.history:
                    merged = [record.merged[k] for k in sorted(record.merged)]
                    print(f"step {record.step:2d}: merged {merged}, {record.step_ms:.1f} ms")
            assert pipe.unet is attached.original_unet  # detached: the eager U-Net is back
            print(f"wrote {save_png(image, args.out)}")

            latents = custom_loop(pipe, runtime, args.prompt, args.steps, args.size, args.seed)
            steps = [r.step for r in runtime.history]
            print(f"custom loop: {len(steps)} engine steps numbered {steps[0]}..{steps[-1]}, "
                  f"final latent {tuple(latents.shape)}")


if __name__ == "__main__":
    main()
