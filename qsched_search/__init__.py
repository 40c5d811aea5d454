"""qsched-search: per-step precision schedules for few-step diffusion models."""

from qsched_search._version import __version__

__all__ = ["__version__", "apply_schedule"]


def __getattr__(name: str):
    # Lazy, so `import qsched_search` stays light for scripts that only need the embedded model's pieces.
    if name == "apply_schedule":
        from qsched_search.pipeline.apply import apply_schedule

        return apply_schedule
    raise AttributeError(f"module 'qsched_search' has no attribute {name!r}")
