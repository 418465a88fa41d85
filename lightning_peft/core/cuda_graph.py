"""Replaying a small no-grad computation as one captured CUDA graph.

Some per-layer bookkeeping is a dozen tiny kernels whose GPU time is negligible but whose launches are
not: DoRA's weight norm is ~10 kernels per adapted layer per optimizer step, and on a 1B model at a few
thousand tokens per step the host cannot launch them as fast as the GPU runs them (measured in
``benchmarks/RESULTS.md``). A CUDA graph (``torch.cuda.CUDAGraph``) records the kernels once and
replays them with one launch.

A graph reads its inputs from the addresses it was captured with. That is sound here because the
computation reads only tensors that stay in place: parameters (optimizers update them in place) and
frozen weights. The inputs' addresses are part of the key; a new address (a moved or replaced tensor)
means a new capture, and a layer whose inputs keep moving (e.g. FSDP re-gathering weights into fresh
buffers) falls back to plain execution after a few captures. The graph's output is a static buffer
that the next replay overwrites without bumping its version counter, so the caller gets a clone:
autograd may still hold the previous result.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import torch

# One memory pool for our live graphs (per device) rather than one per graph: a private pool per layer
# would reserve at least one allocator segment per adapted layer. Sharing is safe because every output
# is cloned straight after its replay, so no graph's static output has to outlive another's replay.
# PyTorch frees a pool with its last graph and refuses a capture into a freed pool, so the handle is
# dropped when its live-graph count returns to zero (e.g. after a model is deleted).
_POOLS: dict[int, list] = {}  # device index -> [pool handle, number of live graphs captured into it]


def _shared_pool(device: torch.device) -> tuple[tuple[int, int], list]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = _POOLS.get(index)
    if entry is None or entry[1] == 0:
        entry = _POOLS[index] = [torch.cuda.graph_pool_handle(), 0]
    return entry[0], entry


def _graph_released(entry: list) -> None:
    entry[1] -= 1


def graphs_usable(tensor: torch.Tensor) -> bool:
    """Capture only eagerly on CUDA: not inside another capture, not while torch.compile traces."""
    return (
        tensor.is_cuda
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
        and not torch.is_inference_mode_enabled()
    )


class GraphedComputation:
    """Runs ``compute()`` through a CUDA graph keyed by the addresses of the tensors it reads.

    Args:
        max_captures: captures allowed before giving up on graphs for this computation (its inputs
            keep moving, so a graph would be recaptured every time).
    """

    def __init__(self, max_captures: int = 3) -> None:
        self.max_captures = max_captures
        self.captures = 0
        self.enabled = True
        self._graph: torch.cuda.CUDAGraph | None = None
        self._output: torch.Tensor | None = None
        self._key: tuple | None = None

    def __call__(self, compute: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if not (self.enabled and graphs_usable(inputs[0])):
            return compute()
        key = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.device) for t in inputs)
        if key != self._key:
            if self.captures >= self.max_captures:
                self._release()
                self.enabled = False
                return compute()
            try:
                self._capture(compute, inputs[0].device)
            except RuntimeError as error:
                # An op that cannot be captured (e.g. one that synchronises with the host): run eagerly,
                # and say so once, since it costs speed.
                warnings.warn(f"CUDA graph capture failed, running eagerly instead: {error}", RuntimeWarning, stacklevel=2)
                self._release()
                self.enabled = False
                return compute()
            self._key = key
        self._graph.replay()
        return self._output.clone()

    def _capture(self, compute: Callable[[], torch.Tensor], device: torch.device) -> None:
        self._release()
        # Warm up on a side stream first, as torch.cuda.graphs' docs require: lazy initialisation (cuBLAS
        # handles and workspaces, allocator blocks) must not happen during capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            compute()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool, entry = _shared_pool(device)
        with torch.cuda.graph(graph, pool=pool):
            output = compute()
        entry[1] += 1
        weakref.finalize(graph, _graph_released, entry)
        self._graph, self._output = graph, output
        self.captures += 1

    def _release(self) -> None:
        self._graph = self._output = self._key = None

    # A captured graph cannot be copied or pickled; a copy (deepcopy of the model, torch.save of the
    # module) starts without one and captures its own on first use.
    def __getstate__(self) -> dict:
        return {"max_captures": self.max_captures, "captures": 0, "enabled": self.enabled, "_graph": None, "_output": None, "_key": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
