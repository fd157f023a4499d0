"""Embed a CA-ToMe engine in a diffusers pipeline, end to end, with the public API only.

1. build the model's engine into a temporary folder with ``build_engine``
   (or take one built before, ``--engine``);
2. load it (TensorRT where it runs, else ONNX Runtime) and attach it to the
   model's ``StableDiffusionPipeline``, loaded without its eager U-Net:
   ``pipe(...)`` now runs the engine, each call starting at step 0 with
   empty merge caches;
3. generate, print the merged tokens per site at every step, detach;
4. drive the same runtime from a hand-written denoising loop with
   ``runtime.set_step(i)``.

    python examples/embed_pipeline.py --out out/embedded.png       # SD 1.5 from the hub (or its local cache)
    python examples/embed_pipeline.py --model path/to/pipeline --size 256 --steps 10
    python examples/embed_pipeline.py --engine engines/sd15    # an engine built before (catome-export build)

``--model`` is a hub id or a local diffusers pipeline folder (``save_pretrained``
output). On a CPU an SD 1.5 build at 512 px takes minutes; a small folder
(e.g. a fine-tune's distilled copy) is quicker.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from catome_export import Runtime, build_engine

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


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
        noise = runtime.unet(model_in, t, encoder_hidden_states=text).sample
        noise_uncond, noise_text = noise.chunk(2)
        latents = pipe.scheduler.step(noise_uncond + 7.5 * (noise_text - noise_uncond), t, latents).prev_sample
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SD15, help=f"hub id or local pipeline folder (default: {SD15})")
    parser.add_argument("--prompt", default="A high-quality photograph of a lighthouse.",
                        help="the prompt (default: a lighthouse)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default: 10)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels, the engine is built for it "
                                                              "(default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    parser.add_argument("--out", default="out/embedded.png", help="the image (default: out/embedded.png)")
    parser.add_argument("--engine", metavar="DIR", help="an engine folder built from --model before, used instead "
                                                         "of building one (default: build one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = Path(args.engine) if args.engine else Path(tmp) / "engine"
        if not args.engine:
            print(f"building {args.model} for {args.size}x{args.size} into {engine_dir} ...")
            # verify=False: a quick example; leave it on (the default) to check the engine against eager CA-ToMe
            build_engine(args.model, resolution=args.size, out_dir=engine_dir, verify=False)
        run(args, engine_dir)


def run(args: argparse.Namespace, engine_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(args.model, unet=None)
    pipe.set_progress_bar_config(disable=True)
    with Runtime.load(engine_dir) as runtime:
        print(runtime)
        with runtime.attach(pipe) as attached:  # pipe.unet is the engine until the block ends
            image = pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                         generator=torch.Generator().manual_seed(args.seed)).images[0]
            for record in attached.history:
                merged = [record.merged[k] for k in sorted(record.merged)]
                print(f"step {record.step:2d}: merged {merged}, {record.step_ms:.1f} ms")
        print(f"detached: pipe.unet is {pipe.unet}")  # None again: the pipeline was loaded without it
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        image.save(args.out)
        print(f"wrote {args.out}")

        latents = custom_loop(pipe, runtime, args.prompt, args.steps, args.size, args.seed)
        steps = [r.step for r in runtime.history]
        print(f"custom loop: {len(steps)} engine steps numbered {steps[0]}..{steps[-1]}, "
              f"final latent {tuple(latents.shape)}")

if __name__ == "__main__":
    main()
