"""Named flag sets for ``--preset``: improved-diffusion README's runs, and a CPU-sized
digits model. A preset only changes defaults: flags given on the command line win.

Each preset has "common" flags (model and diffusion) and per-command extras.
"""

from __future__ import annotations

# Tables of flags, laid out by hand.
# fmt: off
_CIFAR10 = dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
                diffusion_steps=4000, noise_schedule="cosine")
_IMAGENET64 = dict(image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True,
                   diffusion_steps=4000, noise_schedule="cosine")
_REF_TRAIN = dict(lr=1e-4, batch_size=128)
_VLB = dict(use_kl=True)
_VLB_TRAIN = dict(lr=1e-4, batch_size=128, schedule_sampler="loss-second-moment")

PRESETS = {
    # Unconditional CIFAR-10, L_hybrid, cosine schedule (the README's cifar10_uncond_50M_500K run).
    "cifar10": {"common": _CIFAR10, "train": _REF_TRAIN},
    # The same with the L_vlb objective and importance-sampled timesteps.
    "cifar10_vlb": {"common": {**_CIFAR10, **_VLB}, "train": _VLB_TRAIN},
    # Unconditional ImageNet-64, L_hybrid, cosine schedule (imagenet64_uncond_100M_1500K).
    "imagenet64": {"common": _IMAGENET64, "train": _REF_TRAIN},
    "imagenet64_vlb": {"common": {**_IMAGENET64, **_VLB}, "train": _VLB_TRAIN},
    # Class-conditional ImageNet-64 (imagenet64_cond_270M_250K).
    "imagenet64_cond": {
        "common": dict(image_size=64, num_channels=192, num_res_blocks=3, learn_sigma=True, class_cond=True,
                       diffusion_steps=4000, noise_schedule="cosine", rescale_learned_sigmas=False,
                       rescale_timesteps=False),
        "train": dict(lr=3e-4, batch_size=2048),
    },
    # A small grayscale model of scikit-learn's handwritten digits (8×8 upsampled to 16×16):
    # 1.08 M parameters, L_hybrid, cosine schedule, 1000 steps; sampled with 100 steps.
    "digits": {
        "common": dict(data_dir="digits", image_size=16, image_channels=1, num_channels=32, num_res_blocks=2,
                       channel_mult="1,2", attention_resolutions="8", num_heads=4, learn_sigma=True,
                       dropout=0.1, diffusion_steps=1000, noise_schedule="cosine"),
        "train": dict(lr=5e-4, batch_size=64, ema_rate="0.999", lr_anneal_steps=12000, log_interval=20,
                      save_interval=1000, keep_checkpoints=2),
        "sample": dict(timestep_respacing="100", num_samples=64, batch_size=64),
        "nll": dict(split="test", num_samples=100, batch_size=100),
    },
}

# fmt: on


def preset_defaults(name: str, command: str) -> dict:
    """The flag defaults of preset ``name`` for ``command`` (train, sample or nll)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    p = PRESETS[name]
    return {**p.get("common", {}), **p.get(command, {})}
