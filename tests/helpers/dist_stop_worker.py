"""Run by tests/training/test_reliability.py under torchrun (2 CPU processes, gloo): the
run-folder lock and the graceful stop with more than one process.

1. ``locked``, locked by another process (the test's holder): every rank must raise
   RunFolderLockedError (rank 0 could not lock it; no rank goes on into it).
2. ``run``: rank 1 alone receives SIGTERM while taking its 3rd batch; both ranks must finish
   that step, save it once and raise TrainingStopped at the same step.
Each rank writes what it saw to result{rank}.json."""

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from helpers.training import blob_images, tiny_config  # noqa: E402
from iddpm_ext import dist_util  # noqa: E402
from iddpm_ext.errors import RunFolderLockedError, TrainingStopped  # noqa: E402
from iddpm_ext.script_util import create_model_and_diffusion  # noqa: E402
from iddpm_ext.training.data import ArraySource, BatchStream  # noqa: E402
from iddpm_ext.training.loop import TrainLoop  # noqa: E402


class SignalAt:
    """A batch stream that sends ``signum`` to this process when it hands out batch ``at``."""

    def __init__(self, stream, at, signum):
        self.stream, self.at, self.signum = stream, at, signum

    def __next__(self):
        item = next(self.stream)
        if self.at is not None and self.stream.position == self.at:
            os.kill(os.getpid(), self.signum)
        return item

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        return self.stream.load_state_dict(state)


def make_loop(out_dir, data):
    cfg = tiny_config(diffusion_steps=4)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    return TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=1, save_interval=1000, resume_checkpoint="", config=cfg,
                     out_dir=out_dir, max_steps=1000, progress=False)  # fmt: skip


def main(out_dir, locked):
    dist_util.setup_dist("cpu")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    images, labels = blob_images(64, 8, 1)
    result = {"rank": rank, "world": world}

    stream = BatchStream(ArraySource(images, labels), 4, rank=rank, world=world, seed=0)
    try:
        make_loop(locked, stream)
        result["locked"] = "no error"
    except RunFolderLockedError as err:
        result["locked"] = str(err)

    stream = BatchStream(ArraySource(images, labels), 4, rank=rank, world=world, seed=0)
    loop = make_loop(os.path.join(out_dir, "run"), SignalAt(stream, 3 if rank == 1 else None, signal.SIGTERM))
    try:
        loop.run_loop()
        result["stopped"] = None
    except TrainingStopped as stop:
        result["stopped"] = {"signal": stop.signal, "step": stop.step, "exit_code": stop.exit_code}
    result["step"] = loop.step
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump(result, f)
    dist_util.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
