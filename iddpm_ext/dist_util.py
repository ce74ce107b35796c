"""Process-group helpers: DDP under ``torchrun`` (NCCL on GPUs, gloo on CPU), or a
one-process group in a plain process, so code that calls ``torch.distributed`` directly
(``dist.all_gather``, ``dist.barrier``, ...) runs either way, as with the reference's
``setup_dist``.

``setup_dist()`` reads torch.distributed.run's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT; WORLD_SIZE=1 included) and joins that group. Without those
variables it makes a one-process group (NCCL on CUDA, gloo on CPU) on 127.0.0.1 and a free
port (a TCP store bound to port 0, so the OS picks it); it does not set the variables, so
child processes do not mistake themselves for torchrun workers. A second call is a no-op.
``cleanup()`` ends a one-process group it made; a torchrun group is kept until the process
exits (torchrun's rendezvous store cannot bring the same ranks together a second time: a
new ``init_process_group`` after ``destroy_process_group`` waits forever), so several
commands run in one torchrun process (``iddpm_ext.cli.main`` called in turn) share it.
The helpers below also work with no group at all (rank 0 of 1), for code that never calls
``setup_dist``.
"""

from __future__ import annotations

import atexit
import math
import os

import torch
import torch.distributed as dist

from .errors import CheckpointError

# What torch.distributed.run sets for every worker (and what init_method="env://" reads).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when a launcher (torchrun) set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
    return all(os.environ.get(name) for name in TORCHRUN_VARIABLES)


def _local_gpu() -> torch.device:
    """The GPU of this process under torchrun: LOCAL_RANK modulo the visible devices."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def setup_dist(device: str | None = None) -> torch.device:
    """Make sure a process group exists (see the module docstring); return this rank's device.

    :param device: "cpu", "cuda" or None (cuda when available). Under torchrun with CUDA
        each rank takes GPU LOCAL_RANK. The backend is NCCL on CUDA and gloo on the CPU, also for
        the one-process group a plain process gets (as the reference's setup_dist).
    """
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = _local_gpu()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_available() or is_initialized():
        return dev
    if launched_by_torchrun():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        atexit.register(_destroy)  # kept for the process's life: see the module docstring
    else:
        # port 0: a free port. NCCL on CUDA as the reference's setup_dist (gloo cannot all_gather
        # CUDA tensors, which the reference's image_sample.py does).
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, store=store, rank=0, world_size=1, device_id=dev if dev.type == "cuda" else None
        )
        _MADE.append(dist.group.WORLD)
    return dev


_MADE = []  # the one-process group setup_dist made, which cleanup() ends


def _destroy():
    if is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str | None = None, flag: str = "--device") -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:N"; None or "": cuda when available) as a torch.device,
    or a ValueError naming ``flag`` for anything else: a malformed or unknown name, another
    device type (this package runs on CPUs and CUDA GPUs), CUDA without a CUDA device, or
    an index past the devices there are."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag}: expected {expected}, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag}: expected {expected}, got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag}: expected a device that exists, got {device!r} (no CUDA device here)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag}: expected cuda:0 .. cuda:{count - 1}, got {device!r}")
    return dev


def cleanup():
    """End the one-process group ``setup_dist`` made in a plain process (a torchrun group, or
    one the caller made, is left as it is)."""
    if _MADE:
        made = _MADE.pop()
        if is_initialized() and dist.group.WORLD is made:
            dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def broadcast_params(tensors):
    """Copy rank 0's values into every rank's tensors (in place)."""
    if get_world_size() > 1:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, 0)


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place; returned for convenience)."""
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t


def rank_counts(num_samples: int, world: int) -> list[int]:
    """How many items each of ``world`` processes makes (contiguous blocks of
    ceil(N / world) global indices; the last ones may be short or empty)."""
    per = math.ceil(num_samples / world)
    return [max(0, min(num_samples, (r + 1) * per) - r * per) for r in range(world)]


def rank_indices(num_samples: int, rank: int, world: int) -> list[int]:
    """The global indices process ``rank`` of ``world`` makes, in order; the blocks
    of ranks 0 .. world-1 concatenate to 0 .. N-1."""
    per = math.ceil(num_samples / world)
    return list(range(rank * per, min(num_samples, (rank + 1) * per)))


def all_gather_rows(t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order.

    t: [n_r, ...] on this rank, where ``counts[r]`` is rank r's n_r (ranks may differ;
    rows are padded to max(counts) for the collective and trimmed after).
    """
    world = get_world_size()
    if world == 1:
        return t
    if len(counts) != world or t.shape[0] != counts[get_rank()]:
        raise ValueError(
            f"counts: expected {world} row counts matching this rank's {t.shape[0]} rows, got {counts}"
        )
    most = max(counts)
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


# -------------------------------------------------------------------------------------
# the reference's names (improved_diffusion.dist_util), for scripts written against it
# -------------------------------------------------------------------------------------


def dev() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    return _local_gpu() if torch.cuda.is_available() else torch.device("cpu")


def load_state_dict(path, **kwargs):
    """What ``torch.load(path, **kwargs)`` returns, as the reference's: a model, EMA or
    optimizer ``.pt`` file (torch's default ``weights_only=True``: tensors, containers and
    numbers only) in the type torch gives (an OrderedDict for a model's state dict); this
    library's ``.safetensors`` weights as a dict of tensors, moved to ``map_location``. A
    missing file raises CheckpointNotFoundError (a FileNotFoundError too); a corrupt one, or
    one that torch refuses to load, a CheckpointError naming the file and why."""
    from .training import checkpoint

    path = str(path)
    checkpoint.check_exists(path)
    if path.endswith(".safetensors"):
        state, _, _ = checkpoint.load_weights(path)
        where = kwargs.get("map_location")
        if where is not None and not callable(where) and not isinstance(where, dict):
            state = {k: v.to(where) for k, v in state.items()}
        return state
    try:
        return torch.load(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle refused, ...
        raise CheckpointError(f"{path}: cannot load this file ({type(err).__name__}: {err})") from None


def sync_params(params):
    """Rank 0's parameter values on every rank (the reference's name for broadcast_params)."""
    broadcast_params(list(params))
