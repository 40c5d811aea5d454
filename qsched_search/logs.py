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
    _drop_messages("torch.utils._pytree", "is an Enum subclass and is now natively supported")


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _drop_messages(logger: str, text: str) -> None:
    """Drops one named message of one library logger: torchao registering its enums with torch's pytree logs a
    deprecation line at import, through torch's own logging setup (whose levels torch._dynamo re-applies, so a level
    set here does not hold; a filter on the logger does)."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, _DropMessage) and f.text == text for f in target.filters):
        target.addFilter(_DropMessage(text))
