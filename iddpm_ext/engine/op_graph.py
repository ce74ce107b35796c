"""Op graphs: "graph capture" for the CPU. A function's operator calls are recorded once, with
real tensors, by ``torch.fx.experimental.proxy_tensor.make_fx``, and then replayed as one
straight-line Python function of ``torch.ops`` calls.

What a replay skips is the Python around the kernels: module ``__call__``\\ s, the fast paths'
per-call decisions (``iddpm_ext.nn``'s dtype / layout / Winograd checks, cache look-ups), the
Python autograd layer of the custom ops and torch's autograd dispatch (a replay runs below
autograd, without grad). The kernels, their arguments and their order are the eager call's,
so a replay gives the eager call's bits. On the CIFAR-10 UNet on one CPU thread this Python is
11–29 ms of an 82–310 ms forward (docs/sampling_engine.md, "Op graphs").

Like a CUDA graph, an op graph is what ran once: the decisions of that call (shapes, dtypes,
layouts, autocast, the library's switches: Winograd, attention impl, …) are baked in, and
Python that is not an operator call (module hooks, counters, prints) runs in the warm-up and
the capture only, not in replays.

- :class:`OpGraph` — ``fn(*args)`` for one argument signature. Tensors the function reads
  that are not arguments (parameters, static buffers) are kept by reference: in-place updates
  of them are seen by the replay, and so are the function's in-place writes to them (the
  sampling engine's static x and step counter). Tensors given as ``watch`` (a model's
  parameters and buffers) are checked before each replay: if one was changed in place since
  the capture (its version counter moved; e.g. ``load_state_dict``), the function is captured
  again, so caches derived from them (prepacked or Winograd-transformed weights) are rebuilt.
- :func:`capture_forward` — a model's forward with one op graph per input signature
  (:class:`CapturedForward`); calls it cannot replay run the model itself.
- :class:`OpGraphBackend` — the sampling engine's capture backend on the CPU (mode ``"graph"``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

import torch

__all__ = ["OpGraph", "CapturedForward", "capture_forward", "OpGraphBackend"]

_PLAIN = (int, float, bool, str, type(None))  # argument values a graph is keyed by as they are


def watched(model) -> tuple:
    """The tensors whose in-place changes invalidate ``model``'s op graphs: its parameters and
    buffers (none for a model that is not an ``nn.Module``)."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple(model.parameters()) + tuple(model.buffers())


def versions(tensors) -> tuple:
    """The version counters of ``tensors`` (they move on every in-place change)."""
    return tuple(t._version for t in tensors)


def _one_fake_mode():
    """A context in which make_fx's real-mode tracing finds one FakeTensorMode for the metadata
    it records per output (else it builds a new mode, with a stack trace, per output: 2.7 s
    instead of 1.0 s for the CIFAR-10 UNet); a null context where torch lacks the API."""
    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode

        return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))
    except (ImportError, AttributeError, TypeError):
        return contextlib.nullcontext()


def _trace(fn, args):
    """The GraphModule of ``fn(*args)`` (its op calls, recorded while it runs for real)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad(), _one_fake_mode():
        return make_fx(fn, tracing_mode="real")(*args)


@contextlib.contextmanager
def _replay_context(device_type: str):
    """No grad, no autocast (casts are in the graph), below autograd (nothing records)."""
    with (
        torch.no_grad(),
        torch.autocast(device_type, enabled=False),
        torch._C._AutoDispatchBelowAutograd(),
    ):
        yield


class OpGraph:
    """``fn(*args)`` replayed from its op graph (see the module docstring).

    :param fn: the function; it returns a tensor, a tuple/list/dict of tensors or None.
    :param watch: tensors whose in-place changes make the graph be captured again.
    :param device_type: "cpu" (or "cuda": the replay's autocast switch-off).

    The first call (and the first after a watched tensor changed) runs ``fn`` once as it is
    (warm-up: lazily built caches are built outside the capture), then captures it (make_fx
    runs it a second time), then replays it; later calls only replay. ``fn`` must be safe to
    run more than once with the same arguments. The arguments of a replay must have the
    signature of the captured call (the caller checks: :class:`CapturedForward` keys its
    graphs by it).
    """

    def __init__(self, fn, watch=(), device_type: str = "cpu"):
        self.fn = fn
        self.watch = tuple(watch)
        self.device_type = device_type
        self.graph = None  # the torch.fx.GraphModule
        self._versions = None
        self.captures = 0

    def capture(self, *args):
        """Warm up, then capture ``fn(*args)``."""
        self.graph = None
        with torch.no_grad():
            self.fn(*args)  # warm-up: caches (packed weights, batched embeddings) made here
        self._versions = versions(self.watch)
        self.graph = _trace(self.fn, args)
        self.captures += 1

    def __call__(self, *args):
        if self.graph is None or versions(self.watch) != self._versions:
            self.capture(*args)
        with _replay_context(self.device_type):
            return self.graph(*args)


def _meta(v):
    """What a captured call's argument (a plain tensor or a ``_PLAIN`` value, as
    :meth:`CapturedForward._replayable` admits) must match: tensor shape, strides, dtype,
    device; other values by equality."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.stride(), v.dtype, v.device)
    return ("value", type(v), v)


class CapturedForward:
    """``model(x, timesteps, **kwargs)`` with one op graph per input signature.

    A call is replayed when grad is off (or no parameter requires grad), it is not inside
    ``torch.compile`` / tracing, and every argument is a plain tensor on ``device`` or a plain
    value; the signature (each tensor's shape, strides, dtype, device; the keyword names; CPU
    autocast on/off and its dtype) picks the graph, captured on first use (``max_graphs``
    kept, least recently used dropped). Other calls run ``model`` itself. ``clear()`` drops
    the graphs: call it after changing a library switch (Winograd, attention impl, …) or
    replacing a parameter object; in-place changes of parameters and buffers are detected.

    ``stats``: ``{"captures", "replays", "eager"}`` call counts.
    """

    def __init__(self, model: torch.nn.Module, max_graphs: int = 4):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if int(max_graphs) < 1:
            raise ValueError(f"max_graphs: expected a positive count, got {max_graphs!r}")
        self.model = model
        self.max_graphs = int(max_graphs)
        self._watch = watched(model)
        self._graphs: OrderedDict = OrderedDict()
        self.stats = {"captures": 0, "replays": 0, "eager": 0}

    def clear(self):
        self._graphs.clear()
        self._watch = watched(self.model)

    def _replayable(self, args, kwargs) -> bool:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._watch):
            return False
        for v in (*args, *kwargs.values()):
            if isinstance(v, torch.Tensor):
                if type(v) is not torch.Tensor or v.device.type != "cpu" or v.requires_grad:
                    return False
            elif not isinstance(v, _PLAIN):
                return False
        return True

    def _key(self, args, kwargs):
        amp = torch.is_autocast_enabled("cpu")
        return (
            tuple(_meta(v) for v in args),
            tuple((k, _meta(v)) for k, v in sorted(kwargs.items())),
            amp,
            torch.get_autocast_dtype("cpu") if amp else None,
        )

    def __call__(self, x, timesteps, **kwargs):
        args = (x, timesteps)
        if not self._replayable(args, kwargs):
            self.stats["eager"] += 1
            return self.model(x, timesteps, **kwargs)
        key = self._key(args, kwargs)
        graph = self._graphs.get(key)
        names = tuple(sorted(kwargs))
        if graph is None:
            model = self.model

            def forward(x, timesteps, *values):
                return model(x, timesteps, **dict(zip(names, values)))

            graph = OpGraph(forward, self._watch, "cpu")
            if len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = graph
        else:
            self._graphs.move_to_end(key)
        values = tuple(kwargs[k] for k in names)
        captures = graph.captures
        try:
            out = graph(x, timesteps, *values)
        except Exception as exc:  # noqa: BLE001 - a function make_fx cannot record runs as it is
            del self._graphs[key]
            warnings.warn(
                f"capture_forward: this call could not be captured ({type(exc).__name__}: {exc}); "
                "running the model itself",
                RuntimeWarning,
                stacklevel=2,
            )
            self.stats["eager"] += 1
            return self.model(x, timesteps, **kwargs)
        self.stats["captures" if graph.captures != captures else "replays"] += 1
        return out


def capture_forward(model: torch.nn.Module, max_graphs: int = 4) -> CapturedForward:
    """``model``'s forward replayed from op graphs (:class:`CapturedForward`). CPU only; use it
    on a model in its inference form, e.g. ``capture_forward(model.to_inference(torch.bfloat16))``.
    Same results as ``model`` (bit for bit: the same kernels in the same order)."""
    return CapturedForward(model, max_graphs)


class OpGraphBackend:
    """The sampling engine's capture backend on the CPU: ``build(warm, step)`` warms up, then
    captures ``step`` (a function of no arguments over the engine's static buffers) as an op
    graph and returns ``(replay, graph, info)`` like the CUDA graph backend. The capture runs
    the step once (the engine resets its buffers before each run)."""

    warmup_iters = 1

    def __init__(self, device: torch.device):
        if device.type != "cpu":
            raise ValueError(f"device: op graphs are the CPU's capture, got {device}")
        self.device = device

    def build(self, warm, step):
        for _ in range(self.warmup_iters):
            warm()
        graph = _trace(step, ())

        def replay():
            with _replay_context("cpu"):
                graph()

        return replay, graph, {"graph_allocated_bytes": 0, "graph_pool_reserved_bytes": 0}
