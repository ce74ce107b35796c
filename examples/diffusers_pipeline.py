"""Sample handwritten digits with Hugging Face diffusers' DDPMPipeline from an improved-diffusion
checkpoint: the small digits model shipped with iddpm_ext, loaded into IDDPMUNet2DModel (our
UNet as a diffusers model) and stepped by IDDPMScheduler (our fused step as a diffusers
scheduler). Then the pipeline is saved and loaded back with diffusers' own calls.

    pip install --no-build-isolation -e ".[diffusers]"   # in a clone; or: pip install diffusers
    python examples/diffusers_pipeline.py --steps 50 --out out/diffusers_example

Runs on the CPU in seconds (16x16 digits, 1.1 M parameters). Writes samples.png and the saved
pipeline (model_index.json, unet/, scheduler/) under --out.
"""

import argparse
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import iddpm_ext
from iddpm_ext.integrations import pipeline_from_improved_diffusion

CHECKPOINT = os.path.join(os.path.dirname(iddpm_ext.__file__), "assets", "digits_ema.safetensors")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (of the 1000 trained)")
    parser.add_argument("--batch", type=int, default=16, help="number of digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/diffusers_example")
    args = parser.parse_args(argv)

    # An improved-diffusion checkpoint as a diffusers pipeline. This one is a .safetensors file
    # of ours, which carries its flags; a reference .pt needs them, e.g.
    # pipeline_from_improved_diffusion("ema_0.9999_500000.pt", image_size=32, num_channels=128,
    #     num_res_blocks=3, learn_sigma=True, diffusion_steps=4000, noise_schedule="cosine").
    # timestep_spacing: "leading" (diffusers' default), "trailing", "linspace" or "respace"
    # (improved-diffusion's respacing).
    pipe = pipeline_from_improved_diffusion(CHECKPOINT, timestep_spacing="respace")
    pipe.set_progress_bar_config(disable=True)

    def sample(p):
        gen = torch.Generator().manual_seed(args.seed)
        return p(
            batch_size=args.batch, num_inference_steps=args.steps, generator=gen, output_type="np"
        ).images

    images = sample(pipe)  # [B, 16, 16, 1] in [0, 1]
    os.makedirs(args.out, exist_ok=True)
    ncol = int(np.ceil(np.sqrt(args.batch)))
    nrow = int(np.ceil(args.batch / ncol))
    grid = np.ones((nrow * 18, ncol * 18), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * 18 + 1 : r * 18 + 17, c * 18 + 1 : c * 18 + 17] = image[..., 0]
    Image.fromarray((grid * 255).round().astype(np.uint8)).resize((ncol * 72, nrow * 72), Image.NEAREST).save(
        os.path.join(args.out, "samples.png")
    )

    # Round trip through diffusers' own save / load (both parts are iddpm_ext classes).
    pipe.save_pretrained(args.out)
    again = DiffusionPipeline.from_pretrained(args.out)
    again.set_progress_bar_config(disable=True)
    same = np.array_equal(sample(again), images)
    print(
        f"{args.batch} digits, {args.steps} steps: {os.path.join(args.out, 'samples.png')}; "
        f"pipeline saved to {args.out} ({type(again.unet).__name__} + {type(again.scheduler).__name__}); "
        f"reloaded samples identical: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
