"""LossSecondMomentResampler under torch.distributed (2 CPU processes, gloo): every rank
ends with the same loss history although each saw different (and differently sized) batches."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, out_dir):
    # A file rendezvous: no TCP port to pick (a port found free can be taken by another test
    # process before the workers bind it).
    store = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        from iddpm_ext import LossSecondMomentResampler, create_gaussian_diffusion

        d = create_gaussian_diffusion(steps=8, noise_schedule="cosine")
        s = LossSecondMomentResampler(d, history_per_term=3)
        rng = np.random.RandomState(100 + rank)
        for _ in range(12):
            n = 3 + rank  # different batch sizes per rank
            ts = torch.tensor(rng.randint(0, 8, size=n))
            losses = torch.tensor(rng.rand(n), dtype=torch.float64)
            s.update_with_local_losses(ts, losses)
        np.save(os.path.join(out_dir, f"hist{rank}.npy"), s._loss_history)
        np.save(os.path.join(out_dir, f"counts{rank}.npy"), s._loss_counts)
        dist.barrier()  # both ranks past their last collective before either tears gloo down
    finally:
        dist.destroy_process_group()
    # Results are on disk. Leave without the interpreter's finalization: gloo's teardown there
    # sometimes aborts the process ("terminate called without an active exception", SIGABRT; seen
    # here about one run in three, with or without the barrier; pytorch/pytorch#65237 is the same
    # crash in torch's own gloo tests), which mp.spawn would report as a failure.
    os._exit(0)


@pytest.mark.slow
def test_histories_identical_across_ranks(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    h0, h1 = np.load(tmp_path / "hist0.npy"), np.load(tmp_path / "hist1.npy")
    assert np.array_equal(h0, h1)
    assert np.array_equal(np.load(tmp_path / "counts0.npy"), np.load(tmp_path / "counts1.npy"))
    # Replay both ranks' draws: the shared history holds, per t, the last 3 losses seen in
    # gather order (rank 0's batch, then rank 1's, round after round).
    rngs = [np.random.RandomState(100 + r) for r in range(2)]
    seen = {t: [] for t in range(8)}
    for _ in range(12):
        for r in range(2):
            ts = rngs[r].randint(0, 8, size=3 + r)
            losses = rngs[r].rand(3 + r)
            for t, loss in zip(ts, losses):
                seen[t].append(loss)
    counts = np.load(tmp_path / "counts0.npy")
    for t in range(8):
        assert counts[t] == min(3, len(seen[t]))
        np.testing.assert_array_equal(h0[t, : counts[t]], seen[t][-3:] if counts[t] == 3 else seen[t])
