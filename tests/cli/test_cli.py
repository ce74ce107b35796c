"""The iddpm command: flags, presets, train -> sample -> nll, reference .pt files, errors."""

import json
import os

import numpy as np
import pytest
import torch

from helpers.training import argv, main, run_cli, tiny_config, tiny_flags, train, write_npz
from iddpm_ext.cli import app as cli
from iddpm_ext.cli.flags import parse_command
from iddpm_ext.cli.presets import PRESETS
from iddpm_ext.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REFERENCE_FLAGS = {
    "train": [
        "data_dir",
        "schedule_sampler",
        "lr",
        "weight_decay",
        "lr_anneal_steps",
        "batch_size",
        "microbatch",
        "ema_rate",
        "log_interval",
        "save_interval",
        "resume_checkpoint",
        "use_fp16",
        "fp16_scale_growth",
    ],
    "sample": ["clip_denoised", "num_samples", "batch_size", "use_ddim", "model_path"],
    "nll": ["data_dir", "clip_denoised", "num_samples", "batch_size", "model_path"],
}


def _parse(command, argv):
    return parse_command(lambda suppress: cli.command_parser(command, suppress), command, argv)


@pytest.mark.parametrize("command", ["train", "sample", "nll"])
def test_help_lists_every_flag_with_text(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in REFERENCE_FLAGS[command] + list(model_and_diffusion_defaults()) + ["preset", "seed", "device"]:
        assert f"--{key}" in text, key
    flat = " ".join(text.split())  # argparse wraps long help lines
    for key, default in model_and_diffusion_defaults().items():  # each flag shows its own default
        entry = flat.split(f"--{key} ")[-1].split(" --")[0]  # its line in the options list
        assert f"(default: {default!r})" in entry, (key, entry)
    parser = cli.command_parser(command)
    for action in parser._actions:
        assert action.help, action.dest  # no flag without help text


def test_reference_defaults_and_types():
    args, explicit = _parse("train", [])
    assert (args.lr, args.batch_size, args.microbatch, args.ema_rate, args.save_interval) == (
        1e-4,
        1,
        -1,
        "0.9999",
        10000,
    )
    assert args.use_fp16 is False and args.rescale_timesteps is True and explicit == set()
    args, explicit = _parse("train", argv("--use_fp16 True --learn_sigma t --ema_rate 0.9999,0.999"))
    assert (
        args.use_fp16 is True
        and args.learn_sigma is True
        and explicit == {"use_fp16", "learn_sigma", "ema_rate"}
    )
    args, _ = _parse("sample", argv("--use_ddim yes --timestep_respacing ddim25"))
    assert args.use_ddim is True and args.timestep_respacing == "ddim25" and args.num_samples == 10000
    args, _ = _parse("train", ["--data", "digits"])  # alias of --data_dir
    assert args.data_dir == "digits"


def test_presets_are_defaults_that_flags_override():
    args, explicit = _parse("train", argv("--preset cifar10 --lr 3e-4"))
    assert (args.image_size, args.num_channels, args.num_res_blocks, args.dropout) == (32, 128, 3, 0.3)
    assert (args.diffusion_steps, args.noise_schedule, args.learn_sigma) == (4000, "cosine", True)
    assert args.lr == 3e-4 and args.batch_size == 128 and {"image_size", "lr"} <= explicit
    args, _ = _parse("train", ["--preset", "imagenet64"])
    assert (args.image_size, args.num_res_blocks, args.learn_sigma) == (64, 3, True)
    args, _ = _parse("train", ["--preset", "cifar10_vlb"])
    assert args.use_kl is True and args.schedule_sampler == "loss-second-moment"
    args, _ = _parse("sample", ["--preset", "digits"])
    assert args.timestep_respacing == "100" and args.image_channels == 1
    args, _ = _parse("nll", ["--preset", "digits"])
    assert args.split == "test" and args.data_dir == "digits"
    for name in PRESETS:  # every preset builds a model
        args, _ = _parse("train", ["--preset", name])
        cfg = {k: getattr(args, k) for k in model_and_diffusion_defaults()}
        with torch.device("meta"):
            model, diffusion = create_model_and_diffusion(**cfg)
        assert diffusion.num_timesteps == args.diffusion_steps


@pytest.mark.slow
def test_train_sample_nll_end_to_end(tmp_path, capsys):
    data = write_npz(str(tmp_path / "d.npz"), n=32)
    run = str(tmp_path / "run")
    flags = "--batch_size 8 --max_steps 4 --save_interval 2 --log_interval 2 --ema_rate 0.5 --lr 1e-3"
    rc = train("--data_dir {data} --out_dir {run} --progress False " + flags, data=data, run=run)
    assert rc == 0
    assert {
        "model000004.safetensors",
        "ema_0.5_000004.safetensors",
        "opt000004.pt",
        "latest.json",
        "progress.jsonl",
        "loss.png",
    } <= set(os.listdir(run))
    # sample: the model flags come from the checkpoint
    out = str(tmp_path / "samples")
    flags = "--num_samples 5 --batch_size 2 --timestep_respacing 4 --trajectory 3 --progress False"
    rc = main("sample --model_path {run} --out_dir {out} " + flags, run=run, out=out)
    assert rc == 0
    with np.load(os.path.join(out, "samples_5x8x8x1.npz")) as f:
        assert f["arr_0"].shape == (5, 8, 8, 1) and f["arr_0"].dtype == np.uint8 and "arr_1" not in f.files
    assert os.path.isfile(os.path.join(out, "samples.png")) and os.path.isfile(
        os.path.join(out, "trajectory.png")
    )
    # an existing output is an error, and the file is kept
    before = open(os.path.join(out, "samples_5x8x8x1.npz"), "rb").read()
    assert main("sample --model_path {run} --num_samples 5 --out_dir {out}", run=run, out=out) == 2
    assert "already exists" in capsys.readouterr().err
    assert open(os.path.join(out, "samples_5x8x8x1.npz"), "rb").read() == before
    # nll
    nll_out = str(tmp_path / "nll")
    model = os.path.join(run, "model000004.safetensors")
    flags = "--num_samples 6 --batch_size 4 --progress False"
    rc = main("nll --model_path {model} --data_dir {data} --out_dir {out} " + flags, model=model, data=data,
              out=nll_out)  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["num_images"] == 6 and "±" in printed
    with np.load(os.path.join(nll_out, "bpd.npz")) as f:
        total, prior = f["total_bpd"], f["prior_bpd"]
    assert total.shape == (6,) and result["bits_per_dim"] == pytest.approx(float(total.mean()))
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(os.path.join(nll_out, f"{name}_terms.npz")) as f:
            assert f["arr_0"].shape == (10,)  # per timestep, as the reference's image_nll
    with np.load(os.path.join(nll_out, "vb_terms.npz")) as f:
        # total = Σ_t vb_t + prior (means over images)
        assert float(f["arr_0"].sum() + prior.mean()) == pytest.approx(float(total.mean()), rel=1e-5)


def test_nll_matches_calc_bpd_loop(tmp_path):
    from iddpm_ext.evaluation.likelihood import bits_per_dim
    from iddpm_ext.training import checkpoint as ckpt
    from iddpm_ext.training.data import open_source, to_model_input

    cfg = tiny_config()
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    model.eval()
    data = write_npz(str(tmp_path / "d.npz"), n=8)
    src = open_source(data, image_size=8, image_channels=1)
    res = bits_per_dim(model, diffusion, src, 5, 5, seed=3)
    torch.manual_seed(3000)
    with torch.no_grad():
        ref = diffusion.calc_bpd_loop(model, to_model_input(src.images[:5]))
    assert np.allclose(res["total_bpd"], ref["total_bpd"].numpy(), rtol=1e-6)
    assert res["vb"].shape == (5, 10)
    del ckpt


def test_reference_pt_checkpoint_with_flags(tmp_path):
    """An improved-diffusion model*.pt (a plain state dict) samples and resumes with its flags."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**cfg)
    pt = str(tmp_path / "ref" / "model000005.pt")
    os.makedirs(os.path.dirname(pt))
    torch.save(model.state_dict(), pt)
    # the reference's optimizer file beside it: a plain AdamW state dict
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.zeros(1, 1, 8, 8), torch.zeros(1)).square().mean().backward()
    opt.step()
    torch.save(opt.state_dict(), os.path.join(os.path.dirname(pt), "opt000005.pt"))
    out = str(tmp_path / "s")
    sample = "sample --model_path {pt} --num_samples 2 --out_dir {out}"
    assert (
        cli.main(argv(sample + " --timestep_respacing 2 --progress False", pt=pt, out=out) + tiny_flags())
        == 0
    )
    # without the flags the defaults do not fit: a clear error
    assert main(sample, pt=pt, out=str(tmp_path / "s2")) == 2
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    run = str(tmp_path / "run")
    resume = "--data_dir {data} --batch_size 8 --max_steps 6 --resume_checkpoint {pt} --out_dir {run}"
    assert train(resume + " --progress False", data=data, pt=pt, run=run) == 0
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == 6  # continued from step 5


@pytest.mark.slow
def test_bad_input_errors_are_one_line(tmp_path, capsys):
    # one real process: exit status 2 and one line, no traceback
    missing, out = str(tmp_path / "missing"), str(tmp_path / "o")
    r = run_cli(argv("train --data_dir {missing} --out_dir {out}", missing=missing, out=out) + tiny_flags())
    assert r.returncode == 2 and "missing: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    data = write_npz(str(tmp_path / "d.npz"), n=16)
    run = str(tmp_path / "run")
    assert train("--data_dir {data} --batch_size 8 --max_steps 1 --out_dir {run} --progress False", data=data,
                 run=run) == 0  # fmt: skip
    capsys.readouterr()

    def fails(words, message, **values):
        args = argv(words, **values) + (tiny_flags() if words.startswith("train") else [])
        assert cli.main(args) == 2
        assert message in capsys.readouterr().err

    message = "learn_sigma=True in the checkpoint but False from the flags"
    fails(
        "sample --model_path {run} --learn_sigma False --out_dir {out}",
        message,
        run=run,
        out=str(tmp_path / "s"),
    )
    assert not os.path.exists(tmp_path / "s")
    fails(
        "train --data_dir {data} --out_dir {run} --max_steps 2",
        "already holds a training run",
        data=data,
        run=run,
    )
    fails("sample --model_path {path}", "no such checkpoint file", path=str(tmp_path / "nope.safetensors"))
    fails("sample", "model_path: expected a checkpoint file")
    fails("train --data_dir {data} --out_dir {out} --class_cond True --num_classes 2",
          "the data has 3 classes", data=data, out=str(tmp_path / "o2"))  # fmt: skip
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_info_reports_the_build_and_what_each_gpu_runs(monkeypatch, capsys):
    from helpers.cuda_fake import FakeCudaC
    from iddpm_ext.ops import attention as A
    from iddpm_ext.ops import loader

    assert main("info") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and ("build" in info) != ("build_error" in info)
    assert ("gpus" in info) == torch.cuda.is_available()
    if not loader.available():
        return
    # Two made-up cards: an sm_86-like one (99 KB of shared memory per block) and a T4 that a
    # 7.5 build reaches. The kernels' sizes are the H100-sized configs' (helpers.cuda_fake).
    cards = [("RTX-like", 8, 6, 99 * 1024), ("T4-like", 7, 5, 64 * 1024)]
    props = [
        type("P", (), dict(name=n, major=a, minor=b, shared_memory_per_block_optin=m)) for n, a, b, m in cards
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(loader, "_C", FakeCudaC(loader._C, {0: 86, 1: 75}))
    monkeypatch.setattr(A, "_CUDA_RUNS", {})
    caps = {
        "dtypes": (torch.float16,),
        "head_dims": (64, 128, 256),
        "max_positions": 2**22,
        "max_batch_heads": 2**31,
    }
    monkeypatch.setitem(A._KERNELS, "cuda", caps)
    assert main("info") == 0
    gpus = json.loads(capsys.readouterr().out)["gpus"]
    assert [(g["name"], g["capability"], g["shared_memory_per_block_optin"]) for g in gpus] == [
        ("RTX-like", "8.6", 99 * 1024),
        ("T4-like", "7.5", 64 * 1024),
    ]
    # fp16/bf16 up to tile width 128 (90 / 81 KB), fp32 not even at 64 (its backward: 120 KB).
    assert gpus[0]["fused_attention"] == {
        "kernel_arch": 86,
        "head_dims": {"float16/bfloat16": [64, 128], "float32": []},
    }
    assert gpus[1]["fused_attention"] == {
        "kernel_arch": 75,
        "head_dims": {"float16/bfloat16": [], "float32": []},
    }
