"""What the sampling engine needs of the device: graph capture of a step function
(:class:`CUDAGraphBackend` on CUDA, the one part that cannot run without a GPU; on the CPU
op graphs, :mod:`.op_graph`; tests may substitute a stand-in through
:func:`graph_backend`), and the device's default generator, into which a
user generator's state is moved for a run (:func:`generator_as_default`) and whose state
warm-up and capture must not move (:func:`rng_preserved`)."""

from __future__ import annotations

import contextlib

import torch

from .op_graph import OpGraphBackend


def default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} was asked for but CUDA is not available")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"device: the engine runs on cpu or cuda, got {device}")


@contextlib.contextmanager
def generator_as_default(generator, device: torch.device):
    """Run the body with ``generator``'s state in the device's default generator (which
    the step function uses), then write the advanced state back into ``generator`` and
    restore the default generator."""
    default = default_generator(device)
    if generator is None or generator is default:
        yield
        return
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


@contextlib.contextmanager
def rng_preserved(device: torch.device):
    """Restore the device's default generator after the body (warm-up and capture must
    not move the random stream of the runs)."""
    default = default_generator(device)
    saved = default.get_state()
    try:
        yield
    finally:
        default.set_state(saved)


class CUDAGraphBackend:
    """Warm-up of a step function on a side stream, then its capture in a CUDA graph.

    ``build(warm, step)`` runs ``warm()`` ``warmup_iters`` times (cuDNN/cuBLAS handles,
    lazily made tables, autotuning), captures ``step()`` and returns
    ``(replay, graph, info)`` with info's memory facts (bytes)."""

    warmup_iters = 2

    def __init__(self, device: torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"mode: 'graph' and 'compile-graph' capture CUDA graphs and need a CUDA device, got {device} "
                "(use mode='eager' or 'compile')"
            )
        self.device = device

    def build(self, warm, step):
        device = self.device
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    warm()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            allocated0 = torch.cuda.memory_allocated(device)
            reserved0 = torch.cuda.memory_reserved(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                step()
            torch.cuda.synchronize(device)
            info = {
                "graph_allocated_bytes": torch.cuda.memory_allocated(device) - allocated0,
                "graph_pool_reserved_bytes": torch.cuda.memory_reserved(device) - reserved0,
            }
        return graph.replay, graph, info


def graph_backend(device: torch.device):
    """The capture backend for ``device``: CUDA graphs on CUDA, op graphs on the CPU
    (:class:`iddpm_ext.engine.op_graph.OpGraphBackend`; tests may substitute a stand-in)."""
    if device.type == "cpu":
        return OpGraphBackend(device)
    return CUDAGraphBackend(device)
