"""CUDA-graph cache shared by both generators' sampling loops.

A sampling loop `fn(*static_inputs) -> output` is captured once per key (batch size,
schedule, dtype, ...) and replayed. The cache is safe against the ways a model changes under
it and bounded:

- it remembers a fingerprint of the model's parameters and buffers ((data_ptr, dtype,
  device, version counter) of each); `.to()`, `.half()`, `load_state_dict`, in-place updates
  or a new tensor assigned to a parameter change the fingerprint, and every captured graph
  is dropped before the next call;
- it keeps at most `max_graphs` graphs, least recently used evicted first; an evicted
  graph is reset, which hands its private memory pool back to the caching allocator;
- the capture call draws the same random numbers as any later replay: the CUDA RNG state is
  saved before the warm-up run and restored after it, so one seed gives one answer whether
  the loop ran eagerly, was captured by this call, or was replayed;
- the generators build their keys with `graph_key`, which adds the ops mode (fused kernels
  or reference_mode()): a loop captured with the fused kernels is never replayed inside
  reference_mode(), nor the other way round;
- capture and replay run on the inputs' device (device guard, side stream made there), not
  on whichever device is current: a model on cuda:1 captures cuda:1's work and registers
  cuda:1's generator.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, NamedTuple, Sequence

import torch
import torch.nn as nn

from tatitok_fast.ops.mode import fused_enabled


class CapturedLoop(NamedTuple):
    replay: Callable[[], None]  # runs the captured work on the static inputs
    static_out: torch.Tensor  # written by replay()
    release: Callable[[], None]  # frees the graph and its memory pool


def capture_cuda_graph(fn: Callable, static_in: Sequence[torch.Tensor]) -> CapturedLoop:
    """Warm up `fn` on a side stream (Triton compiles, cuBLAS workspaces, allocator), then
    capture it. The warm-up's random draws are undone, so the caller's RNG stream is left as
    if only the captured work had run."""
    device = static_in[0].device
    with torch.cuda.device(device):  # current device = the model's: the RNG the capture registers, the streams
        rng = torch.cuda.get_rng_state(device)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn(*static_in)
        current.wait_stream(side)
        torch.cuda.set_rng_state(rng, device)
        graph = torch.cuda.CUDAGraph()
        # an explicit capture stream on `device`: torch.cuda.graph's default is one stream made
        # once, on whichever device was current the first time any graph was captured
        with torch.cuda.graph(graph, stream=side):
            static_out = fn(*static_in)
        current.wait_stream(side)

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return CapturedLoop(replay, static_out, graph.reset)


def graph_key(*parts: Hashable) -> tuple:
    """A sampling loop's cache key: the caller's parts (batch, schedule, dtype, ...) and the
    ops mode the loop runs in ("fused", or "reference" inside reference_mode())."""
    return (*parts, "fused" if fused_enabled() else "reference")


def parameter_fingerprint(module: nn.Module) -> tuple:
    """(data_ptr, dtype, device, version) of every parameter and buffer: changes when the
    module is moved or cast, loads a state dict or is updated in place."""
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        out.append((t.data_ptr(), t.dtype, t.device, version))
    return tuple(out)


class _GraphRunner:
    """LRU cache of captured sampling loops, keyed by the caller's key, dropped whenever the
    owning module's parameters or buffers change. Replays reuse the captured output buffer,
    so results are cloned before returning.

    capture: how to capture a loop (the CUDA-graph capture; tests of the bookkeeping pass a
    stand-in)."""

    def __init__(self, max_graphs: int = 4, capture: Callable[..., CapturedLoop] = capture_cuda_graph):
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected an int >= 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.capture = capture
        self.graphs: OrderedDict[Hashable, tuple[CapturedLoop, list[torch.Tensor]]] = OrderedDict()
        self._fingerprint: tuple | None = None

    def clear(self) -> None:
        """Drop every captured graph and free its memory pool."""
        while self.graphs:
            _, (loop, _static_in) = self.graphs.popitem(last=False)
            loop.release()

    def __call__(self, key: Hashable, fn: Callable, inputs: Sequence[torch.Tensor],
                 module: nn.Module | None = None) -> torch.Tensor:
        """Run `fn(*inputs)` through the graph captured for `key` (capturing it first).
        module: whose parameters and buffers the loop reads (the cache is dropped when they
        change)."""
        if module is not None:
            fp = parameter_fingerprint(module)
            if fp != self._fingerprint:
                self.clear()
                self._fingerprint = fp
        entry = self.graphs.get(key)
        if entry is None:
            static_in = [t.clone() for t in inputs]
            entry = (self.capture(fn, static_in), static_in)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                _, (old, _old_in) = self.graphs.popitem(last=False)
                old.release()
        else:
            self.graphs.move_to_end(key)
        loop, static_in = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        loop.replay()
        return loop.static_out.clone()

    # a copied or pickled model starts with an empty cache (graphs belong to one module)
    def __deepcopy__(self, memo) -> "_GraphRunner":
        return _GraphRunner(self.max_graphs, self.capture)

    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs, "capture": self.capture}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"], state["capture"])


def _use_graph(use_cuda_graph: bool | None, device: torch.device, generator) -> bool:
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph: CUDA graphs need a CUDA model, this one is on {device}")
    # a user generator's Philox offsets would be frozen into the graph; use eager for those
    return bool(use_cuda_graph) and generator is None
