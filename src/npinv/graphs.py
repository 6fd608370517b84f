"""Launch-free UNet calls: each distinct call captured once as a CUDA graph, then replayed.

An eager UNet call on a GPU is bound by the host launching its ~1000 kernels one by one, whatever
the batch (docs/architecture.md "GPU fast path"). A CUDA graph records those launches once and replays
them with one launch, reading its inputs from static buffers: a call copies its inputs into the
buffers of its key's graph, replays it and copies the output out.

:class:`GraphCache` holds the keying, the buffers, the bound and the fallback, and takes the capture
itself as a function (:func:`cuda_capture` on CUDA; a test passes a fake one on the CPU). A call is
keyed by its inputs' shapes, dtypes and device and by a caller's key (the model's: its weights and
the attention processors installed, so a Prompt-to-Prompt controller's layers are their own graph).
A caller's key of None means "run this call eagerly"; so does grad mode (NTI's optimisation), a
capture that failed (one warning for the cache, that key eager from then on), and a disabled cache.

Attention processors and graphs. A graph replays the kernels its capture ran: a processor whose
Python decides per call what to launch (a Prompt-to-Prompt window opening at step k) would be
frozen at the capture's choice. So the model graphs a call only when every installed processor is
either one of diffusers' own (stateless) or says how to key it: ``processor.graph_key()`` returns a
hashable that changes whenever its launches would (e.g. which window is open), reading per-step
numbers from device tensors it updates in place, or None for "not now: run eagerly". Any other
processor (npinv's controlled attention unless it implements ``graph_key``) runs eagerly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

# Graphs kept per model: a few batch sizes and latent sizes, and a controller or two. They share
# one memory pool, so the bound limits host objects and buffers more than GPU memory.
DEFAULT_CAPACITY = 8


@dataclasses.dataclass
class Captured:
    """A captured call: ``replay()`` recomputes ``output`` (a static tensor) from the static inputs."""

    replay: Callable[[], Any]
    output: torch.Tensor
    graph: Any = None  # what must stay alive for replay (the CUDA graph)


CaptureFn = Callable[[Callable[[], torch.Tensor]], Captured]


def cuda_capture(run: Callable[[], torch.Tensor], *, pool: Any = None, stream: Any = None,
                 warmup: int = 1) -> Captured:
    """Capture ``run`` (which reads static buffers and returns its output) as a CUDA graph on ``stream``
    (a side stream; one per cache, so that its captures share their pool's blocks).

    The warm-up call first lets lazy initialisation (cuBLAS handles, kernel choices, a controller's
    per-layout tables) happen outside the capture, as torch's docs prescribe. ``capture_begin`` rather
    than ``torch.cuda.graph``: the context manager also synchronises the device and empties the
    allocator's cache before each capture, a cost paid per edit when an edit's layers get graphs of
    their own, and not needed here (the side stream waits for the current one's work)."""
    side = stream if stream is not None else torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a web server's other threads touching CUDA do not invalidate the capture.
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            output = run()
        except BaseException:
            with contextlib.suppress(Exception):  # the capture's own error, if any, says less than run's
                graph.capture_end()
            raise
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return Captured(graph.replay, output, graph)


def eager_capture(run: Callable[[], torch.Tensor]) -> Captured:
    """A stand-in capture for the CPU (tests, benchmark smoke runs): the output is a static tensor that
    each replay recomputes eagerly from the static inputs, as a graph's replay would."""
    output = run()
    return Captured(lambda: output.copy_(run()), output)


class HostReadInCapture(RuntimeError):
    """A call read a device value back to the host while being captured (a real capture fails there)."""


# Operations that need a device value on the host: a CUDA graph capture fails on them.
_HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")


def recording_capture(run: Callable[[], torch.Tensor]) -> Captured:
    """A stand-in capture for the CPU that replays as a graph does: ``run``'s tensor operations are
    recorded once (through torch's dispatcher), and a replay re-executes them on the same tensors with
    no Python of ``run``'s in between, so what Python decided at capture (a controller's branch, a
    number read per step) stays as it was then, and per-step inputs must be tensors updated in place.
    A host read during the capture raises :class:`HostReadInCapture`, as a real capture fails."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[tuple[Any, tuple, dict, Any]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func._schema.name in _HOST_READS:
                raise HostReadInCapture(f"{func._schema.name} reads a device value during a graph capture")
            out = func(*args, **kwargs)
            ops.append((func, args, kwargs, out))
            return out

    with Recorder():
        output = run()

    def replay() -> None:
        for func, args, kwargs, out in ops:
            fresh = func(*args, **kwargs)
            # Views and in-place results alias tensors updated already; other results are written into
            # the tensors the capture made, which later operations (and the caller) read.
            if any(r.alias_info is not None for r in func._schema.returns):
                continue
            for old, new in zip(out if isinstance(out, (tuple, list)) else (out,),
                                fresh if isinstance(fresh, (tuple, list)) else (fresh,), strict=True):
                if isinstance(old, torch.Tensor):
                    old.copy_(new)

    return Captured(replay, output)


@dataclasses.dataclass
class GraphStats:
    """What the cache did (benchmarks and tests read it): graphs captured, replays (cache hits and the
    first call of each capture), eager calls, failed captures and evicted graphs."""

    captures: int = 0
    replays: int = 0
    eager: int = 0
    failures: int = 0
    evictions: int = 0


@dataclasses.dataclass
class _Entry:
    static: dict[str, torch.Tensor]
    captured: Captured


class GraphCache:
    """Captured calls by key, least recently used evicted beyond ``capacity``.

    ``capture``: the capture function (default :func:`cuda_capture` with one shared memory pool,
    safe since replays run one at a time on one stream and each output is copied out at once)."""

    def __init__(self, *, enabled: bool, capture: CaptureFn | None = None, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.enabled = enabled
        self.capacity = capacity
        self._capture = capture
        self._pool: Any = None
        self._stream: Any = None
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._failed: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._warned = False
        self.stats = GraphStats()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph (needed after replacing or moving the model's weights, which graphs read in place)."""
        self._entries.clear()
        self._failed.clear()

    def run(self, inputs: Mapping[str, torch.Tensor], fn: Callable[..., torch.Tensor],
            key: Hashable | None) -> torch.Tensor:
        """``fn(**inputs)``, through the graph of ``(key, the inputs' shapes)`` where one can be used.

        The result is a new tensor on either path (a replay's output is copied out of the graph)."""
        if not self.enabled or key is None or torch.is_grad_enabled():
            self.stats.eager += 1
            return fn(**inputs)
        # Inference mode too: its static buffers could not be written outside it (nor the reverse).
        full = (key, torch.is_inference_mode_enabled(),
                tuple((name, tuple(x.shape), x.dtype, x.device) for name, x in inputs.items()))
        entry = self._entries.get(full)
        if entry is None:
            if full in self._failed:
                self.stats.eager += 1
                return fn(**inputs)
            entry = self._capture_entry(full, inputs, fn)
            if entry is None:
                self.stats.eager += 1
                return fn(**inputs)
        else:
            self._entries.move_to_end(full)
            for name, x in inputs.items():
                entry.static[name].copy_(x)
        entry.captured.replay()
        self.stats.replays += 1
        return entry.captured.output.clone()

    def _capture_entry(self, full: Hashable, inputs: Mapping[str, torch.Tensor],
                       fn: Callable[..., torch.Tensor]) -> _Entry | None:
        static = {name: x.detach().clone(memory_format=torch.contiguous_format) for name, x in inputs.items()}
        try:
            captured = self._capture_with_pool(lambda: fn(**static))
        except Exception as exc:  # an operation that cannot be captured: eager for this key, never a crash
            self.stats.failures += 1
            self._failed[full] = None
            while len(self._failed) > self.capacity:
                self._failed.popitem(last=False)
            if not self._warned:
                self._warned = True
                from npinv.model import NpinvWarning

                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                warnings.warn(f"CUDA graph capture failed ({first[:200]}); those UNet calls run without graphs "
                              "(slower, same results)", NpinvWarning, stacklevel=4)
            return None
        self.stats.captures += 1
        entry = _Entry(static, captured)
        self._entries[full] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        return entry

    def _capture_with_pool(self, run: Callable[[], torch.Tensor]) -> Captured:
        if self._capture is not None:
            return self._capture(run)
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        return cuda_capture(run, pool=self._pool, stream=self._stream)


def processors_key(modules: list[Any]) -> tuple | None:
    """The graph key of the attention processors installed on ``modules`` (diffusers ``Attention``
    layers), or None when one of them must run eagerly (see the module's docstring)."""
    parts: list[Hashable] = []
    for module in modules:
        proc = module.processor
        graph_key = getattr(proc, "graph_key", None)
        if graph_key is not None:
            key = graph_key()
            if key is None:
                return None
            parts.append((proc, key))
        elif type(proc).__module__.startswith("diffusers."):
            parts.append(proc)  # keyed by identity: another processor object is another graph
        else:
            return None
    return tuple(parts)
