"""Replays a denoiser call as one captured CUDA graph per (level, input signature), so a step costs no host work.

A compiled quantized denoiser is host-bound at batch 1 (measured on an H100 with regional compile: SDXL at 1024 px
cost less per call than at 512 px, and every torchao level ran slower than bf16): dynamo guards, tensor-subclass
dispatch and a few thousand kernel launches per call. A CUDA graph replays the recorded kernels with one launch.

Each (level, signature) gets its own graph with static input buffers; a call copies its tensors into them and
replays. Switching the level is therefore choosing another graph: no weights move. All graphs draw their
intermediates from one memory pool, which is safe because they replay one after another on one stream and every
graph's outputs stay allocated (no capture can reuse them).

The outputs returned are the graph's static buffers: the next replay of the same graph overwrites them, as in
torch.compile's "reduce-overhead" mode. A denoising loop consumes each step's output before the next call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from qsched_search.errors import QschedError

__all__ = ["GraphCache"]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static_leaves: list  # the captured call's inputs, flattened; tensors are the static buffers
    output: Any


def _leaf_key(leaf) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    try:
        hash(leaf)
    except TypeError:
        raise QschedError(f"CUDA-graph replay keys graphs by the denoiser's non-tensor inputs; got an unhashable "
                          f"{type(leaf).__name__}; pass tensors or plain values, or build the bank with cuda_graphs=False") from None
    return ("V", leaf)


@dataclass
class GraphCache:
    """Captured graphs of one callable per level, keyed by the call's input shapes, dtypes and non-tensor values.

    Args:
        warmup (`int`, defaults to 2): untimed calls on a side stream before a capture (lazy initialisations, and
            the compile of a torch.compile'd callable, must not happen inside the capture).
        share_pool (`bool`, defaults to `True`): all graphs share one memory pool for their intermediates.
    """

    warmup: int = 2
    share_pool: bool = True
    capture_seconds: dict = field(default_factory=dict)
    captures: int = 0
    replays: int = 0
    _entries: dict = field(default_factory=dict)
    _pool: Any = None

    def key(self, level: str, args: tuple, kwargs: dict) -> tuple:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        return (level, str(spec), tuple(_leaf_key(x) for x in leaves))

    def has(self, level: str, args: tuple, kwargs: dict) -> bool:
        return self.key(level, args, kwargs) in self._entries

    def __call__(self, level: str, fn: Callable, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (level, str(spec), tuple(_leaf_key(x) for x in leaves))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(key, fn, leaves, spec)
        for src, dst in zip(leaves, entry.static_leaves):
            if isinstance(src, torch.Tensor) and src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        entry.graph.replay()
        self.replays += 1
        return entry.output

    def _capture(self, key: tuple, fn: Callable, leaves: list, spec) -> _Entry:
        devices = {x.device for x in leaves if isinstance(x, torch.Tensor)}
        if not devices or any(d.type != "cuda" for d in devices):
            raise QschedError(f"CUDA-graph replay needs CUDA tensor inputs; got devices {sorted(map(str, devices))}; "
                              "build the bank with cuda_graphs=False on this device")
        started = time.perf_counter()
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        s_args, s_kwargs = pytree.tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*s_args, **s_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool if self.share_pool else None):
                output = fn(*s_args, **s_kwargs)
        except Exception as exc:  # a host sync inside the call invalidates the capture; the CUDA error says little
            raise QschedError(f"level {key[0]!r}: CUDA-graph capture failed ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); something in the call "
                              "syncs with the host (seen: torchao's eager int8 matmul falls back to the CPU for shapes "
                              "cuBLAS rejects); compile the bank (compile='regional' or 'full') or pass cuda_graphs=False") from exc
        if self.share_pool and self._pool is None:
            self._pool = graph.pool()
        entry = _Entry(graph, static, output)
        self._entries[key] = entry
        self.captures += 1
        torch.cuda.synchronize()
        self.capture_seconds[key] = time.perf_counter() - started
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._pool = None
