"""Trajectory prefix reuse: schedules that share their first k levels share their first k denoiser outputs.

Every schedule of a search runs on the same prompts, seeds and initial noise, so two schedules with the same first k
levels call the denoiser with the same inputs for the first k steps. The rollout keeps those calls' outputs, keyed
by the batch, the levels of steps 0..i, the call within the step and anything else that shapes the trajectory (Q-Sched
coefficients); a later schedule with a cached prefix is answered from here for those steps and the pipeline replays
the rest of each step itself: the scheduler, the generators and the latents then evolve exactly as in a run from
noise, for any scheduler, bit for bit. Only denoiser calls are saved; text encoding and the VAE still run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

import torch
from torch.utils import _pytree as pytree

__all__ = ["PrefixCache"]


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def _copy(value: Any) -> Any:
    # A copy: CUDA-graph replays return static buffers that the next call overwrites, and pipelines may change an
    # output in place.
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


class PrefixCache:
    """Denoiser outputs by prefix key, least recently used dropped first once `max_bytes` is exceeded.

    Args:
        max_bytes (`int`, *optional*): the memory budget of the kept outputs (on their own device); 0 disables the
            cache. None sizes it from the first schedule run (`AUTO_STEPS` times one step's outputs for the whole
            evaluation set: every 2- and 3-step prefix of a 4-level space fits, and the LRU keeps the rest useful).
    """

    AUTO_STEPS = 128

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} is negative; pass 0 to disable the cache")
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.calls_run = 0  # denoiser calls that ran
        self.calls_served = 0  # denoiser calls answered from here
        self.evicted = 0

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self.calls_served += 1
        return _copy(entry[0])

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if self.max_bytes == 0 or (self.max_bytes is not None and size > self.max_bytes) or key in self._entries:
            return
        self._entries[key] = (_copy(value), size)
        self.bytes += size
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evicted += 1

    def size_from(self, step_bytes: int) -> None:
        """Fixes an automatic budget from the bytes of one step's outputs for the whole evaluation set."""
        if self.max_bytes is None and step_bytes > 0:
            self.max_bytes = self.AUTO_STEPS * int(step_bytes)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        """Denoiser calls run and served, and what a run without reuse would have made (their sum)."""
        return {"denoiser_calls_run": self.calls_run, "denoiser_calls_served": self.calls_served,
                "denoiser_calls_without_reuse": self.calls_run + self.calls_served, "entries": len(self),
                "bytes": self.bytes, "max_bytes": self.max_bytes, "evicted": self.evicted}
