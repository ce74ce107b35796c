"""The reference's module names (improved_diffusion.X -> iddpm_ext.X) and the helpers its
scripts import from them: image_datasets.load_data, fp16_util, logger, train_util."""

import collections
import importlib
import json
import os

import numpy as np
import pytest
import torch

from helpers.training import blob_images, mixed_mode_image_folder, tiny_config, write_npz
from iddpm_ext import fp16_util, logger, train_util
from iddpm_ext.image_datasets import load_data
from iddpm_ext.training.data import DataError

# The names the reference's scripts (image_train/image_sample/image_nll/super_res_*) and
# notebooks import from each of its modules (a table, laid out by hand).
# fmt: off
REFERENCE_NAMES = {
    "gaussian_diffusion": ["GaussianDiffusion", "get_named_beta_schedule", "betas_for_alpha_bar",
                           "ModelMeanType", "ModelVarType", "LossType", "_extract_into_tensor"],
    "respace": ["SpacedDiffusion", "space_timesteps"],
    "resample": ["create_named_schedule_sampler", "ScheduleSampler", "UniformSampler", "LossAwareSampler",
                 "LossSecondMomentResampler"],
    "losses": ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"],
    "nn": ["SiLU", "GroupNorm32", "conv_nd", "linear", "avg_pool_nd", "update_ema", "zero_module",
           "scale_module", "mean_flat", "normalization", "timestep_embedding", "checkpoint",
           "CheckpointFunction"],
    "unet": ["UNetModel", "SuperResModel", "AttentionBlock", "ResBlock", "QKVAttention", "Upsample",
             "Downsample", "TimestepBlock", "TimestepEmbedSequential"],
    "script_util": ["model_and_diffusion_defaults", "create_model_and_diffusion", "create_model",
                    "create_gaussian_diffusion", "sr_model_and_diffusion_defaults",
                    "sr_create_model_and_diffusion", "sr_create_model", "add_dict_to_argparser",
                    "args_to_dict", "str2bool", "NUM_CLASSES"],
    "dist_util": ["setup_dist", "dev", "load_state_dict", "sync_params"],
    "fp16_util": ["convert_module_to_f16", "convert_module_to_f32", "make_master_params",
                  "model_grads_to_master_grads", "master_params_to_model_params", "unflatten_master_params",
                  "zero_grad"],
    "image_datasets": ["load_data", "ImageDataset", "_list_image_files_recursively"],
    "logger": ["configure", "log", "logkv", "logkv_mean", "dumpkvs", "get_dir", "reset", "record_tabular",
               "dump_tabular", "profile_kv", "profile"],
    "train_util": ["TrainLoop", "parse_resume_step_from_filename", "get_blob_logdir",
                   "find_resume_checkpoint", "find_ema_checkpoint", "log_loss_dict"],
}
# fmt: on


@pytest.mark.parametrize("module", sorted(REFERENCE_NAMES))
def test_reference_module_names_exist(module):
    mod = importlib.import_module(f"iddpm_ext.{module}")
    missing = [n for n in REFERENCE_NAMES[module] if not hasattr(mod, n)]
    assert not missing, f"iddpm_ext.{module} lacks {missing}"


# -------------------------------------------------------------------------------------
# image_datasets.load_data
# -------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    images, labels = blob_images(12, size=12, channels=3)
    names = ["cat", "dog", "emu"]
    sub = tmp_path / "imgs" / "nested"
    sub.mkdir(parents=True)
    for i, (im, y) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(sub / f"{names[y]}_{i:03d}.png")
    return str(tmp_path / "imgs"), labels


def test_load_data_from_an_image_folder(image_folder):
    folder, labels = image_folder
    data = load_data(data_dir=folder, batch_size=4, image_size=8, class_cond=True, deterministic=True)
    x, cond = next(data)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert -1.0 <= x.min().item() and x.max().item() <= 1.0
    assert set(cond) == {"y"} and cond["y"].dtype == torch.int64
    # deterministic: file order (sorted names), labels = sorted name prefixes -> 0, 1, 2
    names = sorted(f"{['cat', 'dog', 'emu'][y]}_{i:03d}.png" for i, y in enumerate(labels))
    expect = [["cat", "dog", "emu"].index(n.split("_")[0]) for n in names[:4]]
    assert cond["y"].tolist() == expect
    again = load_data(data_dir=folder, batch_size=4, image_size=8, class_cond=True, deterministic=True)
    assert torch.equal(next(again)[0], x)
    for _ in range(5):  # endless: 12 images = 3 batches per pass
        next(data)


def test_image_files_in_the_reference_order(tmp_path):
    from iddpm_ext.image_datasets import _list_image_files_recursively

    root = mixed_mode_image_folder(tmp_path / "imgs")
    rel = [os.path.relpath(p, root) for p in _list_image_files_recursively(str(root))]
    # each folder's entries sorted by name, subfolders where they sort; .gif counts
    assert rel == ["a_0.png", "b_sub/d_2.png", "b_sub/inner/a_3.png", "b_sub/z_6.JPEG", "c_1.png",
                   "e_4.jpg", "f_5.gif", "g_7.png"]  # fmt: skip


def test_images_are_scaled_in_their_own_mode_then_converted(tmp_path):
    """The reference scales a palette / RGBA / LA image as it is and converts to RGB after;
    converting first gives other pixels (up to ~160 levels here)."""
    from PIL import Image

    from iddpm_ext.training.data import load_image, resize_center_crop

    root = mixed_mode_image_folder(tmp_path / "imgs")
    for name in ("c_1.png", "b_sub/d_2.png", "g_7.png", "f_5.gif"):
        with Image.open(root / name) as im:
            im.load()
            scaled_first = np.asarray(resize_center_crop(im, 16).convert("RGB"))
            converted_first = np.asarray(resize_center_crop(im.convert("RGB"), 16))
        got = load_image(str(root / name), 16, 3)
        assert np.array_equal(got, scaled_first), name
        assert not np.array_equal(got, converted_first), name  # the case is one where order matters


def test_image_dataset_matches_load_data(tmp_path):
    from iddpm_ext.image_datasets import ImageDataset, _list_image_files_recursively

    root = str(mixed_mode_image_folder(tmp_path / "imgs"))
    files = _list_image_files_recursively(root)
    x, cond = next(load_data(data_dir=root, batch_size=8, image_size=16, class_cond=True, deterministic=True))
    ds = ImageDataset(16, files, classes=cond["y"].tolist())
    assert len(ds) == 8
    for i in range(8):
        arr, out = ds[i]
        assert arr.dtype == np.float32 and arr.shape == (3, 16, 16)
        assert np.array_equal(arr, x[i].numpy()) and out["y"].dtype == np.int64 and out["y"] == cond["y"][i]
    shard = ImageDataset(16, files, shard=1, num_shards=3)  # the reference's image_paths[shard::num_shards]
    assert shard.local_images == files[1::3] and len(shard) == 3 and ds[4][0].shape == shard[1][0].shape
    assert np.array_equal(shard[1][0], ds[4][0]) and shard[1][1] == {}


@pytest.mark.parametrize("deterministic,per_epoch", [(True, 1), (False, 2)])
def test_load_data_draws_from_torch_like_the_reference_dataloader(tmp_path, deterministic, per_epoch):
    """The reference's load_data is a DataLoader: each epoch's iterator draws an int64 base seed
    from torch's global generator (a shuffling sampler one more), so a seeded script's later
    draws depend on them. Ours draws the same at each epoch start (2 batches per epoch here)."""
    path = write_npz(str(tmp_path / "d.npz"), n=8)
    for batches in range(1, 5):
        kw = dict(batch_size=4, image_size=8, image_channels=1, deterministic=deterministic)
        data = load_data(data_dir=path, **kw)
        torch.manual_seed(0)
        for _ in range(batches):
            next(data)
        got = torch.rand(3)
        torch.manual_seed(0)
        for _ in range((batches + 1) // 2 * per_epoch):  # epochs started × draws per epoch
            torch.empty((), dtype=torch.int64).random_()
        assert torch.equal(got, torch.rand(3)), batches


def test_load_data_unconditional_shuffled_and_other_sources(tmp_path):
    path = write_npz(str(tmp_path / "d.npz"), n=16)
    x, cond = next(load_data(data_dir=path, batch_size=8, image_size=8, image_channels=1))
    assert x.shape == (8, 1, 8, 8) and cond == {}
    a = [
        next(load_data(data_dir=path, batch_size=8, image_size=8, image_channels=1, seed=s))[0]
        for s in (0, 1)
    ]
    assert not torch.equal(a[0], a[1])  # the order is shuffled (seeded)
    x, cond = next(
        load_data(data_dir="digits", batch_size=5, image_size=8, image_channels=1, class_cond=True)
    )
    assert x.shape == (5, 1, 8, 8) and cond["y"].shape == (5,)


def test_load_data_errors(tmp_path):
    with pytest.raises(DataError, match="data_dir: unspecified"):
        load_data(data_dir="", batch_size=2, image_size=8)
    with pytest.raises(DataError, match="no such file or folder"):
        load_data(data_dir=str(tmp_path / "missing"), batch_size=2, image_size=8)
    path = write_npz(str(tmp_path / "nolabels.npz"), n=8, labels=False)
    with pytest.raises(DataError, match="class_cond"):
        load_data(data_dir=path, batch_size=2, image_size=8, image_channels=1, class_cond=True)


# -------------------------------------------------------------------------------------
# fp16_util
# -------------------------------------------------------------------------------------


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Linear(3, 2))


def test_master_params_round_trip_and_gradients():
    model = _small_model()
    params = list(model.parameters())
    master = fp16_util.make_master_params(params)
    assert len(master) == 1 and master[0].dtype == torch.float32 and master[0].requires_grad
    assert master[0].numel() == sum(p.numel() for p in params)
    views = fp16_util.unflatten_master_params(params, master)
    assert isinstance(views, tuple) and len(views) == len(params)  # the reference's type
    for p, m in zip(params, views):
        assert m.shape == p.shape and torch.equal(m, p.detach())
    x = torch.randn(2, 2, 5, 5)
    model(x).sum().backward()
    fp16_util.model_grads_to_master_grads(params, master)
    assert torch.equal(master[0].grad, torch.cat([p.grad.reshape(-1) for p in params]))
    with torch.no_grad():
        master[0].add_(1.0)
    before = [p.detach().clone() for p in params]
    fp16_util.master_params_to_model_params(iter(params), master)  # a generator works too
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b + 1.0)
    fp16_util.zero_grad(params)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_fp16_convs_and_master_copy():
    model = _small_model()
    model.apply(fp16_util.convert_module_to_f16)
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32
    master = fp16_util.make_master_params(model.parameters())
    assert master[0].dtype == torch.float32
    fp16_util.master_params_to_model_params(list(model.parameters()), master)
    assert model[0].weight.dtype == torch.float16  # values copied into the model's own dtype
    model.apply(fp16_util.convert_module_to_f32)
    assert model[0].weight.dtype == torch.float32


def test_fp16_util_errors():
    model = _small_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="parameter 0 .* has no gradient"):
        fp16_util.model_grads_to_master_grads(params, fp16_util.make_master_params(params))
    with pytest.raises(ValueError, match="master_params: .* values for model parameters of"):
        fp16_util.unflatten_master_params(params[:1], fp16_util.make_master_params(params))


# -------------------------------------------------------------------------------------
# logger
# -------------------------------------------------------------------------------------


def test_logger_formats_and_means(tmp_path, capsys):
    d = str(tmp_path / "logs")
    with logger.scoped_configure(dir=d, format_strs=["stdout", "log", "csv", "json"]):
        assert logger.get_dir() == d
        logger.log("hello", 3)
        logger.logkv("step", 1)
        for v in (1.0, 2.0, 6.0):
            logger.logkv_mean("loss", v)
        assert logger.dumpkvs() == {"step": 1, "loss": pytest.approx(3.0)}
        logger.logkv("step", 2)
        logger.logkv("grad_norm", 0.5)  # a new key: the CSV header grows
        logger.dumpkvs()
        assert logger.getkvs() == {}
    out = capsys.readouterr().out
    assert "hello 3" in out and "| loss" in out
    with open(os.path.join(d, "progress.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "loss,step,grad_norm"
    assert rows[1].split(",")[:2] == ["3.0", "1"] and rows[1].split(",")[2] == ""
    assert rows[2] == ",2,0.5"
    with open(os.path.join(d, "progress.json")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(os.path.join(d, "log.txt")) as f:
        assert "hello 3" in f.read()


def test_logger_reference_aliases_and_profiling(tmp_path, monkeypatch):
    times = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])
    monkeypatch.setattr(logger.time, "time", lambda: next(times))

    @logger.profile("work")
    def work(a, b=1):
        return a + b

    with logger.scoped_configure(dir=str(tmp_path / "logs"), format_strs=[]):
        logger.record_tabular("step", 7)
        with logger.profile_kv("io"):
            pass
        assert work(2, b=3) == 5 and work.__name__ == "work"
        assert logger.dump_tabular() == {"step": 7, "wait_io": 0.5, "wait_work": 0.25}
        with logger.profile_kv("io"):
            pass
        assert logger.getkvs() == {"wait_io": 1.0}  # summed afresh after each dump


def test_logger_continues_a_folders_files(tmp_path):
    """A later configure() into the same folder (a training script started again) continues
    log.txt, progress.csv (its header kept, widened when needed) and progress.json."""
    d = str(tmp_path / "logs")
    for step in (1, 2):
        with logger.scoped_configure(dir=d, format_strs=["log", "csv", "json"]):
            logger.logkv("step", step)
            if step == 2:
                logger.logkv("extra", 1.5)
            logger.dumpkvs()
    with open(os.path.join(d, "progress.csv")) as f:
        assert f.read().splitlines() == ["step,extra", "1,", "2,1.5"]
    with open(os.path.join(d, "progress.json")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(os.path.join(d, "log.txt")) as f:
        assert f.read().count("Logging to") == 2


def test_logger_environment_defaults_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "csv")
    try:
        logger.configure()
        assert logger.get_dir() == str(tmp_path / "env")
        assert os.path.exists(tmp_path / "env" / "progress.csv")
        with pytest.raises(ValueError, match="format_strs: expected names from"):
            logger.configure(dir=str(tmp_path / "x"), format_strs=["log", "nope"])
        assert not os.path.exists(tmp_path / "x")  # names checked before anything is made
    finally:
        logger.reset()


# -------------------------------------------------------------------------------------
# train_util
# -------------------------------------------------------------------------------------


def test_train_util_helpers(tmp_path):
    p = train_util.parse_resume_step_from_filename
    assert p("runs/x/model012000.pt") == 12000
    assert p("/a/model000100.safetensors") == 100
    assert p("ema_0.9999_001000.pt") == 0 and p("modelfinal.pt") == 0 and p("weights.pt") == 0
    main = tmp_path / "model000200.pt"
    assert train_util.find_ema_checkpoint(str(main), 200, 0.999) is None
    (tmp_path / "ema_0.999_000200.pt").write_bytes(b"")
    assert train_util.find_ema_checkpoint(str(main), 200, 0.999) == str(tmp_path / "ema_0.999_000200.pt")
    assert train_util.find_ema_checkpoint(None, 200, 0.999) is None
    assert train_util.find_resume_checkpoint() is None


def test_log_loss_dict_quartiles(tmp_path):
    from iddpm_ext.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=100)
    ts = torch.tensor([0, 10, 30, 60, 99])
    losses = {"loss": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}
    with logger.scoped_configure(dir=str(tmp_path), format_strs=[]):
        train_util.log_loss_dict(diffusion, ts, losses)
        kvs = logger.dumpkvs()
    assert kvs["loss"] == pytest.approx(3.0)
    assert kvs["loss_q0"] == pytest.approx(1.5)  # t = 0, 10
    assert kvs["loss_q1"] == pytest.approx(3.0) and kvs["loss_q2"] == pytest.approx(4.0)
    assert kvs["loss_q3"] == pytest.approx(5.0)


def test_reference_training_hooks_and_attributes(tmp_path, monkeypatch):
    """$DIFFUSION_BLOB_LOGDIR (where the reference's trainer saves) and $DIFFUSION_TRAINING_TEST
    (its integration-test hook: run_loop returns after the first checkpoint), and the
    reference's TrainLoop attributes."""
    from iddpm_ext.resample import create_named_schedule_sampler
    from iddpm_ext.script_util import create_model_and_diffusion

    blob = str(tmp_path / "blob")
    monkeypatch.setenv("DIFFUSION_BLOB_LOGDIR", blob)
    monkeypatch.setenv("DIFFUSION_TRAINING_TEST", "1")
    assert train_util.get_blob_logdir() == blob
    model, diffusion = create_model_and_diffusion(**tiny_config())
    npz = write_npz(str(tmp_path / "d.npz"), n=8)
    data = load_data(data_dir=npz, batch_size=2, image_size=8, image_channels=1)
    with logger.scoped_configure(dir=str(tmp_path / "logs"), format_strs=[]):
        loop = train_util.TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1,
                                    lr=1e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=3,
                                    resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3,
                                    schedule_sampler=create_named_schedule_sampler("uniform", diffusion),
                                    weight_decay=0.0, lr_anneal_steps=0,  # no end: the hook stops it
                                    max_steps=20, progress=False, log=lambda *a: None)  # fmt: skip
    assert loop.out_dir == blob
    assert loop.ema_rate == [0.9, 0.99] and loop.resume_checkpoint == "" and loop.resume_step == 0
    assert loop.use_fp16 is False and loop.fp16_scale_growth == 1e-3
    loop.run_loop()
    assert loop.step == 3  # stopped at its first checkpoint, not at max_steps
    names = sorted(os.listdir(blob))
    assert [n for n in names if n.startswith("model")] == ["model000003.safetensors"]
    monkeypatch.delenv("DIFFUSION_TRAINING_TEST")
    again = train_util.TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1,
                                 lr=1e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=3,
                                 resume_checkpoint=blob, lr_anneal_steps=0, max_steps=4, progress=False,
                                 log=lambda *a: None)  # fmt: skip
    assert again.resume_step == 3 and again.step == 3
    again.run_loop()
    assert again.step == 4  # without the hook: on to max_steps


def test_reference_style_training_script(tmp_path):
    """The reference's image_train.py body with only the import prefix changed."""
    from iddpm_ext import dist_util
    from iddpm_ext.resample import create_named_schedule_sampler
    from iddpm_ext.script_util import create_model_and_diffusion

    cfg = tiny_config()
    model, diffusion = create_model_and_diffusion(**cfg)
    model.to(dist_util.dev() if torch.cuda.is_available() else "cpu")
    data = load_data(
        data_dir=write_npz(str(tmp_path / "d.npz"), n=16),
        batch_size=4,
        image_size=cfg["image_size"],
        image_channels=1,
    )
    with logger.scoped_configure(dir=str(tmp_path / "run"), format_strs=[]):
        # saves to the logger's folder
        loop = train_util.TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=-1,
                                    lr=1e-3, ema_rate="0.9999", log_interval=1, save_interval=2,
                                    resume_checkpoint="",
                                    schedule_sampler=create_named_schedule_sampler("uniform", diffusion),
                                    weight_decay=0.0, lr_anneal_steps=2, progress=False,
                                    log=lambda *a: None)  # fmt: skip
    loop.run_loop()
    assert loop.step == 2
    assert np.isfinite([p.detach().sum().item() for p in model.parameters()]).all()
    names = os.listdir(tmp_path / "run")
    assert any(n.startswith("model") for n in names) and any(n.startswith("ema_0.9999") for n in names)
    # the reference's sampling script loads weights with dist_util.load_state_dict
    weights = sorted(n for n in names if n.startswith("model"))[-1]
    state = dist_util.load_state_dict(str(tmp_path / "run" / weights), map_location="cpu")
    model.load_state_dict(state)
    torch.save(state, tmp_path / "ref_style.pt")
    again = dist_util.load_state_dict(str(tmp_path / "ref_style.pt"), map_location="cpu")
    assert all(torch.equal(again[k], v) for k, v in state.items())
    assert dist_util.dev().type in ("cpu", "cuda")
    dist_util.sync_params(model.parameters())  # one process: nothing to do, no error
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):  # as torch.load's
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))
    # what torch.load returns, as the reference's: a state dict as its OrderedDict, and the
    # optimizer file the reference's TrainLoop writes (opt*.pt: the bare optimizer state)
    torch.save(model.state_dict(), tmp_path / "model000002.pt")
    assert isinstance(dist_util.load_state_dict(str(tmp_path / "model000002.pt")), collections.OrderedDict)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.zeros(1, cfg["image_channels"], cfg["image_size"], cfg["image_size"])
    model(x, torch.tensor([1])).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt000002.pt")
    loaded = dist_util.load_state_dict(str(tmp_path / "opt000002.pt"), map_location="cpu")
    assert set(loaded) == {"state", "param_groups"} and loaded["param_groups"][0]["lr"] == 1e-3
    torch.optim.AdamW(model.parameters(), lr=1.0).load_state_dict(loaded)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.pt: cannot load this file"):
        dist_util.load_state_dict(str(tmp_path / "junk.pt"))
