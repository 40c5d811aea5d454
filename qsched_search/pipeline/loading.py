"""Loads a diffusers pipeline by hub id, local folder or the embedded default, and fingerprints its denoiser."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qsched_search.errors import QschedError
from qsched_search.pipeline.families import Family, detect_family, load_family
from qsched_search.resources import EMBEDDED_MODEL_DIR

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A pipeline with what the rest of the tool needs to know about it."""

    pipe: object
    family: Family
    model_id: str
    device: str
    loras: object = None  # the `LoraSet` fused into the pipeline (`qsched_search.pipeline.lora.apply_loras`), if any

    @property
    def denoiser(self):
        return self.family.denoiser_of(self.pipe)

    def weights_sha256(self) -> str:
        """A hash of the denoiser's parameters: identifies the weights a schedule was searched on."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.denoiser.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _quiet_libraries() -> None:
    # Their loading bars and hints (install accelerate...) would bury our own progress and one-line errors.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _check_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise QschedError(f"model folder {str(folder)!r} has no model_index.json: pass a diffusers pipeline folder (save_pretrained output) or a hub id")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise QschedError(f"model folder {str(folder)!r}: model_index.json is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for name, spec in components.items():
        if isinstance(spec, list) and spec[0] is not None and not (folder / name).is_dir():
            raise QschedError(f"model folder {str(folder)!r} lacks component folder {name!r} named in model_index.json")


def load_model(model: str | None = None, device: str = "cpu", dtype: str = "float32", family: str | None = None) -> LoadedModel:
    """Loads a pipeline.

    Args:
        model (`str`, *optional*): `"embedded"` or None for the shipped Fashion-MNIST model, a local folder written
            by `save_pretrained`, or a hub id (needs the hub or its cache).
        device (`str`, defaults to `"cpu"`): where the pipeline runs; nothing is moved implicitly later.
        dtype (`str`, defaults to `"float32"`): the pipeline's own (reference) precision.
        family (`str`, *optional*): a file name in configs/families; detected from the pipeline class if omitted.
    """
    from diffusers import DiffusionPipeline

    _quiet_libraries()
    if dtype not in DTYPES:
        raise QschedError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = model or EMBEDDED
    is_embedded = model == EMBEDDED
    folder = EMBEDDED_MODEL_DIR if is_embedded else Path(model).expanduser()
    looks_local = is_embedded or folder.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        if not folder.is_dir():
            raise QschedError(f"model {model!r} not found: no such folder; pass a diffusers pipeline folder or a hub id like 'stabilityai/sd-turbo'")
        _check_folder(folder)
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renamed torch_dtype to dtype; the old name keeps older releases working.
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(folder) if looks_local else model, torch_dtype=DTYPES[dtype],
                                                     local_files_only=looks_local)
    except QschedError:
        raise
    except Exception as exc:  # diffusers raises many types (OSError, ValueError, EnvironmentError) for a bad model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "local folder" if looks_local else "hub id (no network or cache here?)"
        raise QschedError(f"could not load model {model!r} as a {where}: {reason[:200]}; pass a folder written by save_pretrained with --model PATH") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    fam = load_family(family) if family else (load_family("embedded") if is_embedded else detect_family(pipe))
    return LoadedModel(pipe=pipe, family=fam, model_id=EMBEDDED if is_embedded else model, device=device)
