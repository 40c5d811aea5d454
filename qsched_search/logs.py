"""Keeps commands quiet: library warnings and chatter go to the debug log, shown with `--verbose`."""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["quiet_libraries"]

# Messages of libraries that a plain run cannot act on: torch's pytree notice about torchao's enums, torchao's notice
# that its optional C++ tensor types did not load, and diffusers' and transformers' deprecation hints.
_LIBRARIES = ("torch", "torchao", "diffusers", "transformers", "huggingface_hub", "optuna", "matplotlib", "PIL", "lpips")


def quiet_libraries(verbose: bool = False) -> None:
    """Routes the libraries' warnings and logs to this package's debug log (to stderr with `verbose`)."""
    logging.captureWarnings(True)
    level = logging.DEBUG if verbose else logging.ERROR
    for name in (*_LIBRARIES, "py.warnings"):
        logging.getLogger(name).setLevel(level)
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        return
    warnings.filterwarnings("ignore", module=r"(torch|torchao|diffusers|transformers|huggingface_hub|optuna|lpips)(\..*)?")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
