"""The flags of ``iddpm train | sample | nll``: improved-diffusion's names, defaults and
meaning (scripts/image_train.py, image_sample.py, image_nll.py, script_util.py), plus ours.
Every flag has help text; ``--preset`` changes defaults, explicit flags win."""

from __future__ import annotations

import argparse

from ..script_util import model_and_diffusion_defaults, str2bool
from .presets import PRESETS, preset_defaults

# The --progress flag of every long-running command (train, sample, nll, demo, reproduce, fid).
PROGRESS_HELP = "progress bars with the rate and the time left, on stderr (main process only); False: none"

MODEL_HELP = {
    "image_size": "image height and width in pixels",
    "num_channels": "base channel count of the UNet (× channel_mult per level)",
    "num_res_blocks": "residual blocks per UNet level",
    "num_heads": "attention heads",
    "num_heads_upsample": "attention heads on the upsampling path (-1: num_heads)",
    "attention_resolutions": "feature-map sizes with attention, comma-separated (e.g. 16,8)",
    "dropout": "dropout probability in the residual blocks",
    "learn_sigma": "learn the reverse-process variances (L_hybrid); the model outputs 2× channels",
    "sigma_small": "fixed variances: posterior β̃_t (True) or β_t (False); only without learn_sigma",
    "class_cond": "class-conditional model (labels from the data)",
    "diffusion_steps": "T, the number of diffusion steps",
    "noise_schedule": "beta schedule: linear or cosine",
    "timestep_respacing": "use a subset of steps: e.g. 250, 10,15,20 or ddim50 (empty: all)",
    "use_kl": "train on the variational bound L_vlb (RESCALED_KL) instead of L_simple/L_hybrid",
    "predict_xstart": "the model predicts x_0 instead of ε",
    "rescale_timesteps": "pass timesteps to the model scaled to [0, 1000)",
    "rescale_learned_sigmas": "scale the vb term by T/1000 in L_hybrid (RESCALED_MSE)",
    "use_checkpoint": "activation checkpointing (less memory, more compute)",
    "use_scale_shift_norm": "FiLM-like scale/shift conditioning in the residual blocks",
    "channel_mult": "channel multipliers per level, e.g. 1,2,2,2 (empty: by image size)",
    "num_classes": "number of classes of a class-conditional model",
    "image_channels": "image channels: 3 (RGB) or 1 (grayscale)",
}

# Tables of flags, laid out by hand.
# fmt: off
TRAIN_DEFAULTS = dict(
    data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, batch_size=1,
    microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="",
    use_fp16=False, fp16_scale_growth=1e-3,
)
# fmt: on
TRAIN_HELP = {
    "data_dir": "the data: an image folder, a .npz (arr_0 uint8 NHWC, arr_1 labels), a CIFAR-10 "
    "python-batches folder, or 'digits' (scikit-learn's digits)",
    "schedule_sampler": "timestep sampling: uniform or loss-second-moment",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "anneal the learning rate linearly to 0 over this many steps, then stop (0: constant, "
    "run until --max_steps or forever)",
    "batch_size": "images per step per process",
    "microbatch": "split each batch into microbatches of this size, accumulating gradients (-1: off)",
    "ema_rate": "comma-separated EMA rates, one EMA checkpoint each",
    "log_interval": "steps per JSONL log record (means over the interval) and plot refresh",
    "save_interval": "steps between checkpoints",
    "resume_checkpoint": "continue from a run folder (its latest.json), a model*.safetensors file, or an "
    "improved-diffusion model*.pt file",
    "use_fp16": "the reference's fp16 flag: same as --amp fp16",
    "fp16_scale_growth": "accepted for compatibility; the GradScaler's own growth is used",
}
# Tables of flags, laid out by hand.
# fmt: off
TRAIN_EXTRA = dict(
    out_dir="runs/train", seed=0, amp="none", grad_clip=0.0, max_steps=0, device="", keep_checkpoints=0,
    random_flip=False, resize="crop", num_workers=0, progress=True, threads=0, tensorboard=False,
    channels_last=False, compile="none", fused_optimizer=True,
)
# fmt: on
TRAIN_EXTRA_HELP = {
    "out_dir": "folder for checkpoints, progress.jsonl, progress.csv, log.txt and loss.png (must not hold "
    "another run); when not given: $OPENAI_LOGDIR if set, else runs/train",
    "seed": "random seed (data order, timesteps, noise, dropout)",
    "amp": "autocast precision: none, bf16 or fp16 (fp16 uses a GradScaler)",
    "grad_clip": "clip the gradient norm to this value (0: no clipping; the norm is logged either way)",
    "max_steps": "stop after this many steps (0: no limit)",
    "device": "cpu or cuda (empty: cuda when available)",
    "keep_checkpoints": "keep only the newest K checkpoints (0: keep all)",
    "random_flip": "mirror half of the training images left-right",
    "resize": "crop: scale and centre-crop images to image_size (the reference); none: images must "
    "already be image_size",
    "num_workers": "data-loading worker processes for image folders (0: load in the main process)",
    "progress": PROGRESS_HELP + " (train: False prints the key table of each log interval instead)",
    "threads": "CPU threads for torch (0: torch's default)",
    "tensorboard": "also write the logged values as TensorBoard events to OUT_DIR/tb (needs the "
    "tensorboard package, not installed with iddpm_ext)",
    "channels_last": "train the UNet's torso in channels-last (NHWC) memory format (checkpoints are "
    "the same; not yet measured on a GPU)",
    "fused_optimizer": "torch's fused AdamW (one kernel over all parameters; the same update up to "
    "float rounding, faster); False: the reference's per-tensor AdamW",
    "compile": "run the network's forward and backward through torch.compile in this mode (none: "
    "eager; reduce-overhead adds CUDA graphs; the first steps compile, for minutes; checkpoints are "
    "the same; not yet measured on a GPU)",
}

# Tables of flags, laid out by hand.
# fmt: off
SAMPLE_DEFAULTS = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")
# fmt: on
SAMPLE_HELP = {
    "clip_denoised": "clip predicted x_0 to [-1, 1] at each step",
    "num_samples": "number of samples",
    "batch_size": "samples per batch per process",
    "use_ddim": "sample with DDIM instead of ancestral sampling",
    "model_path": "weights: a .safetensors file, a run folder (its latest EMA), or an improved-diffusion .pt",
}
# Tables of flags, laid out by hand.
# fmt: off
SAMPLE_EXTRA = dict(eta=0.0, seed=0, out_dir="runs/samples", device="", label=-1, trajectory=0,
                    overwrite=False, fused=True, progress=True, threads=0, engine="auto", amp="none",
                    inference=False, capture=False)
# fmt: on
SAMPLE_EXTRA_HELP = {
    "eta": "DDIM η, in [0, 1] (0: deterministic; 1: noise of the posterior's variance β̃_t)",
    "seed": "seed; sample i depends only on (seed, i), not on batch size or processes",
    "out_dir": "folder for samples_NxHxWxC.npz and samples.png",
    "device": "cpu or cuda (empty: cuda when available)",
    "label": "class for every sample of a class-conditional model (-1: random over the model's classes)",
    "trajectory": "also write trajectory.png with this many steps of the first 8 samples (0: off)",
    "overwrite": "replace existing output files",
    "fused": "use the fused sampling-step kernels where they apply (False: eager path; loop engine only)",
    "amp": "run the network under autocast in this precision: none, bf16 or fp16 (the sampling steps "
    "stay float32; samples differ from float32 ones at the precision's rounding)",
    "inference": "switch the UNet to its inference fast paths first (UNetModel.to_inference: on the CPU "
    "channels-last, packed and Winograd convolutions, batched time embeddings; samples differ from "
    "the plain path at float rounding)",
    "capture": "loop sampler on the CPU: replay the network from op graphs (iddpm_ext.engine."
    "capture_forward: its operator calls recorded once per batch shape, 1-2 s for a CIFAR-10 UNet, "
    "then run without the Python around them): the same samples, about a tenth faster per step "
    "with --inference",
    "progress": PROGRESS_HELP,
    "threads": TRAIN_EXTRA_HELP["threads"],
    "engine": "sampler: graph (one captured step replayed per timestep: a CUDA graph, on the CPU an op "
    "graph), compile, compile-graph (the compiled step captured in a CUDA graph), eager (the engine's "
    "step with in-kernel per-sample noise), loop (per-sample generator noise), or auto: "
    "graph on CUDA, loop elsewhere",
}

# Tables of flags, laid out by hand.
# fmt: off
NLL_DEFAULTS = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="")
# fmt: on
NLL_HELP = {
    "data_dir": TRAIN_HELP["data_dir"],
    "clip_denoised": "clip predicted x_0 to [-1, 1]",
    "num_samples": "number of data images to evaluate (the first ones of the split)",
    "batch_size": "images per batch per process",
    "model_path": SAMPLE_HELP["model_path"],
}
# Tables of flags, laid out by hand.
# fmt: off
NLL_EXTRA = dict(split="train", seed=0, out_dir="runs/nll", device="", overwrite=False, resize="crop",
                 progress=True, threads=0, amp="none", inference=False, capture=False)
# fmt: on
NLL_EXTRA_HELP = {
    "split": "train or test (CIFAR-10 and digits have a test split; folders and .npz: everything)",
    "seed": "seed of the bound's noise",
    "out_dir": "folder for vb_terms.npz, mse_terms.npz, xstart_mse_terms.npz and bpd.npz",
    "device": "cpu or cuda (empty: cuda when available)",
    "overwrite": "replace existing output files",
    "resize": TRAIN_EXTRA_HELP["resize"],
    "progress": PROGRESS_HELP,
    "threads": TRAIN_EXTRA_HELP["threads"],
    "amp": "run the network under autocast in this precision: none, bf16 or fp16 (the bound's terms "
    "stay float32)",
    "inference": "switch the UNet to its inference fast paths first (UNetModel.to_inference; terms "
    "differ from the plain path at float rounding)",
    "capture": "CPU: replay the network from op graphs (iddpm_ext.engine.capture_forward: its operator "
    "calls recorded once per batch shape, then run without the Python around them; the bound calls "
    "it T times per batch): the same terms",
}

CHOICES = {
    "noise_schedule": ["linear", "cosine"],
    "schedule_sampler": ["uniform", "loss-second-moment"],
    "amp": ["none", "bf16", "fp16"],
    "resize": ["crop", "none"],
    "split": ["train", "test"],
    "engine": ["auto", "graph", "compile", "compile-graph", "eager", "loop"],
    "compile": ["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
}

COMMANDS = {
    "train": ((TRAIN_DEFAULTS, TRAIN_HELP), (TRAIN_EXTRA, TRAIN_EXTRA_HELP)),
    "sample": ((SAMPLE_DEFAULTS, SAMPLE_HELP), (SAMPLE_EXTRA, SAMPLE_EXTRA_HELP)),
    "nll": ((NLL_DEFAULTS, NLL_HELP), (NLL_EXTRA, NLL_EXTRA_HELP)),
}


def _add(group, key, default, help_text, suppress):
    kind = str2bool if isinstance(default, bool) else (str if default is None else type(default))
    shown = f" (default: {default!r})"  # also on the probe parser, which answers --help
    names = [f"--{key}"] + (["--data"] if key == "data_dir" else [])
    kwargs = dict(
        dest=key, type=kind, default=argparse.SUPPRESS if suppress else default, help=help_text + shown
    )
    if key in CHOICES:
        kwargs["choices"] = CHOICES[key]
    if isinstance(default, bool):
        kwargs["metavar"] = "BOOL"
    group.add_argument(*names, **kwargs)


def add_command_flags(parser, command: str, suppress: bool = False):
    """All flags of ``command`` on ``parser`` (``suppress``: no defaults, to see which
    flags were given)."""
    (ref, ref_help), (extra, extra_help) = COMMANDS[command]
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=argparse.SUPPRESS if suppress else None,
        help="a named flag set (explicit flags override it): " + ", ".join(sorted(PRESETS)),
    )
    g = parser.add_argument_group(f"improved-diffusion {command} flags")
    for key, default in ref.items():
        _add(g, key, default, ref_help[key], suppress)
    g = parser.add_argument_group("model and diffusion flags (improved-diffusion's script_util)")
    for key, default in model_and_diffusion_defaults().items():
        _add(g, key, default, MODEL_HELP[key], suppress)
    g = parser.add_argument_group("iddpm_ext flags")
    for key, default in extra.items():
        _add(g, key, default, extra_help[key], suppress)


def parse_command(parser_factory, command: str, argv) -> tuple[argparse.Namespace, set]:
    """(args, explicit): args with the preset's defaults applied; explicit = flags given on
    the command line plus those set by the preset."""
    probe = parser_factory(suppress=True)
    given = vars(probe.parse_args(argv))
    parser = parser_factory(suppress=False)
    explicit = set(given) - {"preset"}
    if given.get("preset"):
        defaults = preset_defaults(given["preset"], command)
        known = {a.dest for a in parser._actions}
        defaults = {k: v for k, v in defaults.items() if k in known}
        parser.set_defaults(**defaults)
        explicit |= set(defaults)
    return parser.parse_args(argv), explicit


def model_config(args) -> dict:
    """The create_model_and_diffusion arguments from parsed flags."""
    return {k: getattr(args, k) for k in model_and_diffusion_defaults()}
