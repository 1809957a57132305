"""A real DiT pipeline, dense and patched, with the same prompt and seed: wall time and the drift between outputs.

Needs network access to the Hugging Face Hub (the weights are downloaded) and a CUDA GPU with enough memory
(FLUX.1-dev: ~35 GB in bf16; Wan 2.1 14B at 720p: ~70 GB).  Nothing here runs in this repository's tests (no
network there); it is written to run unchanged where the weights are reachable:

    python examples/dit_real_models.py --model flux --method gna
    python examples/dit_real_models.py --model flux --method clear
    python examples/dit_real_models.py --model wan --method radial --steps 50
    python examples/dit_real_models.py --model flux --method gna --overrides '{"dense_first_steps": 4}'

It prints the time of each run and the PSNR of the patched image (or video) against the dense one: a measure of
drift from dense, the honest first check of a training-free method on your model, not a quality score.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import patchattn

MODELS = {
    "flux": dict(repo="black-forest-labs/FLUX.1-dev", pipeline="FluxPipeline",
                 call=dict(height=1024, width=1024, guidance_scale=3.5), steps=28),
    "sd3": dict(repo="stabilityai/stable-diffusion-3.5-large", pipeline="StableDiffusion3Pipeline",
                call=dict(height=1024, width=1024, guidance_scale=4.5), steps=28),
    "wan": dict(repo="Wan-AI/Wan2.1-T2V-14B-Diffusers", pipeline="WanPipeline",
                call=dict(height=720, width=1280, num_frames=81, guidance_scale=5.0), steps=50),
}
PROMPT = "A red fox crossing a snowy forest clearing at dawn, cinematic light, detailed fur"


def load(name: str):
    import diffusers

    entry = MODELS[name]
    pipe = getattr(diffusers, entry["pipeline"]).from_pretrained(entry["repo"], torch_dtype=torch.bfloat16)
    return pipe.to("cuda"), entry


def generate(pipe, entry, steps: int, seed: int):
    generator = torch.Generator("cuda").manual_seed(seed)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **entry["call"])
    torch.cuda.synchronize()
    frames = result.frames[0] if hasattr(result, "frames") else result.images[0]
    return np.asarray(frames, dtype=np.float32), time.perf_counter() - start


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)  # outputs are in [0, 1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="flux")
    dit_methods = ", ".join(m.name for m in patchattn.list_methods() if "dit" in m.families)
    p.add_argument("--method", default="gna", help=f"a DiT method ({dit_methods})")
    p.add_argument("--overrides", default="{}", help="config fields as JSON, e.g. '{\"dense_first_steps\": 4}'")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    overrides = json.loads(args.overrides)
    patchattn.get_config(args.method, **overrides)  # a wrong name or field fails here, before any download

    pipe, entry = load(args.model)
    steps = args.steps or entry["steps"]
    dense, dense_s = generate(pipe, entry, steps, args.seed)
    handle = patchattn.patch(pipe, args.method, **overrides)  # a pipeline: its scheduler counts steps
    print(handle.summary())
    patched, patched_s = generate(pipe, entry, steps, args.seed)
    patchattn.unpatch(pipe)
    print(f"dense {dense_s:.1f} s, {args.method} {patched_s:.1f} s ({dense_s / patched_s:.2f}x); "
          f"PSNR vs dense {psnr(dense, patched):.2f} dB (drift from dense, not quality)")


if __name__ == "__main__":
    main()
