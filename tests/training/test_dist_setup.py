"""dist_util.setup_dist always leaves a usable process group, as the reference's does: a plain
process gets a one-process gloo group on a free local port, torchrun's variables (WORLD_SIZE=1
included) give that group; a second call changes nothing. (torchrun itself, with 1 and 2
processes, runs in tests/compat/test_reference_scripts.py and test_distributed.py.)"""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from iddpm_ext import dist_util

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _end_any_group():
    dist_util.cleanup()
    if dist.is_initialized():  # a torchrun-style or caller-made group, which cleanup() keeps
        dist.destroy_process_group()


@pytest.fixture
def no_group(monkeypatch):
    """No process group and no torchrun variables before the test; none left after it."""
    _end_any_group()
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    _end_any_group()


def test_plain_process_gets_a_one_process_gloo_group(no_group):
    assert not dist_util.launched_by_torchrun() and not dist.is_initialized()
    assert dist_util.setup_dist("cpu") == torch.device("cpu")
    assert dist.is_initialized()
    assert dist.get_backend() == "gloo"
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    assert (dist_util.get_rank(), dist_util.get_world_size()) == (0, 1)
    group = dist.group.WORLD
    assert dist_util.setup_dist("cpu") == torch.device("cpu")  # idempotent
    assert dist.group.WORLD is group
    # the collectives the reference's scripts call directly
    x = torch.arange(3.0)
    parts = [torch.zeros_like(x)]
    dist.all_gather(parts, x)
    assert torch.equal(parts[0], x)
    y = x.clone()
    dist.all_reduce(y)
    assert torch.equal(y, x)
    dist.barrier()
    dist_util.sync_params([y])
    # it sets no launcher variables, so child processes do not take themselves for torchrun workers
    assert not any(name in os.environ for name in TORCHRUN_ENV)
    dist_util.cleanup()
    assert not dist.is_initialized()


def test_partial_launcher_variables_are_not_torchrun(no_group, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # e.g. left by a scheduler, with no address to meet at
    assert not dist_util.launched_by_torchrun()
    dist_util.setup_dist("cpu")
    assert dist.get_world_size() == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_variables_with_world_size_one_make_that_group(no_group, monkeypatch):
    port = str(_free_port())
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist_util.launched_by_torchrun()
    dist_util.setup_dist("cpu")
    assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
    parts = [torch.zeros(2)]
    dist.all_gather(parts, torch.ones(2))
    assert torch.equal(parts[0], torch.ones(2))
    # A torchrun group outlives cleanup() (torchrun's store cannot rendezvous the ranks twice):
    # the next command in this process joins it again.
    group = dist.group.WORLD
    dist_util.cleanup()
    assert dist.is_initialized() and dist.group.WORLD is group
    dist_util.setup_dist("cpu")
    assert dist.group.WORLD is group


def test_cleanup_ends_only_the_group_setup_dist_made(no_group):
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # the caller's own group
    group = dist.group.WORLD
    dist_util.setup_dist("cpu")  # joins it
    dist_util.cleanup()
    assert dist.is_initialized() and dist.group.WORLD is group
    dist.destroy_process_group()
    dist_util.setup_dist("cpu")  # makes one
    dist_util.cleanup()
    assert not dist.is_initialized()


def test_helpers_work_without_any_group(no_group):
    """Code that never calls setup_dist still sees rank 0 of 1."""
    assert (dist_util.get_rank(), dist_util.get_world_size(), dist_util.is_main()) == (0, 1, True)
    t = torch.ones(2)
    assert dist_util.all_reduce_sum(t) is t and dist_util.broadcast_object(5) == 5
    dist_util.barrier()
    dist_util.sync_params([t])
    assert dist_util.dev().type in ("cpu", "cuda")
