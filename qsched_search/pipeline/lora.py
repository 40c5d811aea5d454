"""LoRAs on a pipeline: loaded with diffusers' `load_lora_weights`, checked to take effect, fused before any bank.

Loading a LoRA into a quantized model fails or silently does nothing (diffusers #10621, #11752, #10492); the order
that works is to fuse the LoRA first and quantize the fused weights. So a run's LoRAs are loaded into the stock
pipeline, each is checked to change the denoiser (its modules matched, its reference images differ from the base
model's by more than the base model's own re-run does), and all are fused into the weights; the peft wrappers are
then taken out of the denoiser, so both banks see plain `Linear` layers holding the fused weights:

    loras = apply_loras(model, ["style.safetensors:0.8"], check=EffectCheck(steps=4, eval_set=eval_set))

`fuse_loaded_loras` does the same for a pipeline whose user loaded LoRAs with `pipe.load_lora_weights` (what
`apply_schedule` calls), and its handle's `remove()` puts the wrappers back and unfuses (as diffusers'
`unfuse_lora` does). Both fuse through diffusers' `fuse_lora`, in the same order, so the fused weights are the same
bits either way.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from qsched_search.errors import QschedError

logger = logging.getLogger(__name__)

__all__ = ["EFFECT_SAMPLES", "LORA_FILE", "EffectCheck", "FusedLoras", "LoadedLora", "LoraSet", "LoraSpec",
           "apply_loras", "fuse_loaded_loras", "lora_mismatch", "modules_sha256", "read_lora_file"]

# diffusers' file name for LoRA weights (`save_lora_weights`); a folder holding it is a LoRA.
LORA_FILE = "pytorch_lora_weights.safetensors"
# Reference samples (the run's first ones) on which each LoRA's effect is measured against the base model's.
EFFECT_SAMPLES = 8
# Keys of the one down-projection ("A") matrix each LoRA-adapted module has, in the formats diffusers reads.
_DOWN_KEY = re.compile(r"(lora_A|lora_down|lora\.down|lora_linear_layer\.down)(\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH_OR_ID[:SCALE]`: a LoRA file, folder or hub id, and the scale it is fused at.

    Args:
        source (`str`): a `.safetensors` (or `.bin`) file, a folder holding `pytorch_lora_weights.safetensors`,
            or a hub id (`org/name`, or `org/name/file.safetensors`).
        scale (`float`, defaults to 1.0): the adapter weight (diffusers' `set_adapters`); not 0, which is no LoRA.
    """

    source: str
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise QschedError(f"--lora {self.source!r} is empty; pass PATH_OR_ID[:SCALE], e.g. style.safetensors:0.8")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise QschedError(f"--lora {self.source}: scale {self.scale!r} is not a finite number; pass e.g. "
                              f"{self.source}:0.8")
        if self.scale == 0:
            raise QschedError(f"--lora {self.source}:0 fuses nothing (scale 0); pass a non-zero scale such as "
                              f"{self.source}:1, or leave the LoRA out")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """`PATH_OR_ID` or `PATH_OR_ID:SCALE`; a path that exists as written is never split at a ':'."""
        text = str(text).strip()
        head, sep, tail = text.rpartition(":")
        if not sep or Path(text).expanduser().exists() or "/" in tail or "\\" in tail:
            return cls(text)
        try:
            scale = float(tail)
        except ValueError:
            raise QschedError(f"--lora {text!r}: the part after the last ':' must be a scale such as 0.8, got "
                              f"{tail!r}; pass PATH_OR_ID or PATH_OR_ID:SCALE") from None
        return cls(head, scale)

    @classmethod
    def coerce(cls, value: "LoraSpec | str | dict") -> "LoraSpec":
        """A spec from a spec, its text form or its dict form (settings files of workers)."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, dict):
            return cls(value.get("source", ""), value.get("scale", 1.0))
        return cls.parse(value)

    def __str__(self) -> str:
        return self.source if self.scale == 1 else f"{self.source}:{self.scale:g}"


_EXTENSIONS = (".safetensors", ".bin", ".pt")


def _hub_file(source: str) -> tuple[str, str] | None:
    """(repo id, file) when `source` reads as a hub id (`org/name` or `org/name/path/file.safetensors`) and is no
    local path; None for a local path."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return None
    parts = source.split("/")
    if len(parts) == 2 and not source.endswith(_EXTENSIONS) and all(parts):
        return source, LORA_FILE
    if len(parts) > 2 and source.endswith(_EXTENSIONS) and all(parts):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def resolve_lora_file(source: str) -> Path:
    """The weights file of a LoRA source: the file itself, `pytorch_lora_weights.safetensors` (or the only
    `.safetensors`) of a folder, or a file of a hub repository (fetched through the hub's cache)."""
    hub = _hub_file(source)
    if hub is None:
        path = Path(source).expanduser()
        if not path.exists():
            raise QschedError(f"--lora {source!r} not found: no such file or folder; pass a LoRA .safetensors file, "
                              f"a folder holding {LORA_FILE}, or a hub id like 'org/name'")
        if path.is_file():
            return path
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise QschedError(f"--lora {source!r} is a folder with {len(files)} .safetensors files and no {LORA_FILE}; "
                          f"pass the file itself ({', '.join(f.name for f in files[:3]) or 'none there'})")
    repo, filename = hub
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # offline, no such repo or file: the hub raises several types
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise QschedError(f"--lora {source!r} is not a local file or folder, and the hub did not give {filename} of "
                          f"{repo} ({reason}); pass a local LoRA .safetensors file") from None


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The LoRA's tensors and the sha256 of its file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise QschedError(f"--lora {str(path)!r} is not a readable LoRA file ({reason}); pass a .safetensors file "
                          "written by save_lora_weights or a LoRA trainer") from None
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise QschedError(f"--lora {str(path)!r} holds no tensors by name; pass a LoRA state dict file")
    return tensors, digest.hexdigest()


@dataclass(frozen=True)
class EffectCheck:
    """Where a LoRA's effect is measured: the run's first `samples` samples at its reference precision.

    Args:
        steps (`int`): denoising steps.
        eval_set (`EvalSet`): the run's prompts and seeds; the first `samples` of them are used.
        batch_size (`int`, defaults to 64): samples per pipeline call.
        call_kwargs (`dict`, *optional*): the run's extra pipeline arguments.
        samples (`int`, defaults to `EFFECT_SAMPLES`).
    """

    steps: int
    eval_set: Any
    batch_size: int = 64
    call_kwargs: dict = field(default_factory=dict)
    samples: int = EFFECT_SAMPLES


@dataclass
class LoadedLora:
    """One LoRA as a run used it: where it came from, what it matched, what it changed."""

    spec: LoraSpec
    file: str
    sha256: str
    adapter: str
    tensors: int
    expected_modules: int
    matched: dict[str, int]
    effect: dict | None = None

    def fingerprint(self) -> dict:
        """What decides a run's numbers: the LoRA's bytes and scale (its id is kept for the reader)."""
        return {"id": self.spec.source, "sha256": self.sha256, "scale": self.spec.scale}

    def to_dict(self) -> dict:
        return {**self.fingerprint(), "file": self.file, "adapter": self.adapter, "matched_modules": dict(self.matched),
                **({"effect": self.effect} if self.effect is not None else {})}

    def describe(self) -> str:
        return f"{self.spec.source} (scale {self.spec.scale:g}, sha256 {self.sha256[:12]})"


@dataclass
class FusedLoras:
    """LoRA adapters fused into a pipeline's weights, with the peft wrappers taken out of its denoiser.

    `remove()` puts the wrappers back and, if the fusing was done here, unfuses the adapters (diffusers'
    `unfuse_lora`: the weights come back to within float rounding).
    """

    pipe: Any
    denoiser_name: str
    adapters: list[str]
    modules: list[str]
    fused_components: list[str]
    _wrappers: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)

    def remove(self) -> None:
        denoiser = getattr(self.pipe, self.denoiser_name)
        for name, wrapper in self._wrappers.items():
            _set_submodule(denoiser, name, wrapper)
        self._wrappers = {}
        for component in self.fused_components:
            model = getattr(self.pipe, component, None)
            for module in _tuner_layers(model):
                module.unmerge()
        self.fused_components = []


@dataclass
class LoraSet:
    """The LoRAs a run fused into its pipeline, and the fused weights of the denoiser modules they changed."""

    loras: list[LoadedLora]
    fused: FusedLoras
    modules_sha256: str
    effect: dict | None = None

    @property
    def modules(self) -> list[str]:
        return self.fused.modules

    def fingerprint(self) -> list[dict]:
        return [lora.fingerprint() for lora in self.loras]

    def to_dict(self) -> dict:
        """The `loras` section of schedule.json and manifests."""
        return {"adapters": [lora.to_dict() for lora in self.loras], "modules": list(self.modules),
                "modules_sha256": self.modules_sha256, **({"effect": self.effect} if self.effect is not None else {})}

    def describe(self) -> str:
        return ", ".join(lora.describe() for lora in self.loras)


def _tuner_layers(model) -> list[torch.nn.Module]:
    if model is None or not isinstance(model, torch.nn.Module):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _lora_components(pipe) -> list[str]:
    return [c for c in getattr(pipe, "_lora_loadable_modules", []) if isinstance(getattr(pipe, c, None), torch.nn.Module)]


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def fuse_loaded_loras(pipe, denoiser_name: str) -> FusedLoras | None:
    """Fuses the active LoRA adapters a pipeline holds (loaded with `load_lora_weights`) into its weights, and takes
    the peft wrappers out of its denoiser, so a bank sees plain layers; None when the denoiser holds no LoRA layer.

    Adapters that are disabled (`disable_lora()`) are not fused: the pipeline ran without them. Adapters already
    fused (`fuse_lora()`) are left as they are.
    """
    if not _has_peft():
        return None
    denoiser = getattr(pipe, denoiser_name)
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
    if not wrapped:
        return None
    adapters = list(dict.fromkeys(a for _, m in wrapped for a in m.active_adapters))
    fused: list[str] = []
    for component in _lora_components(pipe):
        layers = _tuner_layers(getattr(pipe, component))
        pending = [m for m in layers if not m.disable_adapters and set(m.active_adapters) - set(m.merged_adapters)]
        if pending:
            fused.append(component)
    if fused:
        pipe.fuse_lora(components=fused, adapter_names=adapters)
    wrappers = {}
    for name, module in wrapped:
        _set_submodule(denoiser, name, module.get_base_layer())
        wrappers[name] = module
    return FusedLoras(pipe=pipe, denoiser_name=denoiser_name, adapters=adapters, modules=[n for n, _ in wrapped],
                      fused_components=fused, _wrappers=wrappers)


def modules_sha256(denoiser: torch.nn.Module, names: Sequence[str]) -> str | None:
    """sha256 of the parameters of the named modules (sorted); None when the denoiser lacks one of them."""
    modules = dict(denoiser.named_modules())
    digest = hashlib.sha256()
    for name in sorted(names):
        if name not in modules:
            return None
        for key, tensor in sorted(modules[name].state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _matched(pipe, adapter: str) -> dict[str, int]:
    out = {}
    for component in _lora_components(pipe):
        n = sum(1 for m in _tuner_layers(getattr(pipe, component))
                if adapter in getattr(m, "lora_A", {}) or adapter in getattr(m, "lora_embedding_A", {}))
        if n:
            out[component] = n
    return out


def _changes_weights(pipe, adapter: str) -> bool:
    """Whether some module's LoRA product B @ A of `adapter` can be non-zero (both matrices have a non-zero)."""
    for component in _lora_components(pipe):
        for m in _tuner_layers(getattr(pipe, component)):
            a, b = getattr(m, "lora_A", {}), getattr(m, "lora_B", {})
            if adapter in a and adapter in b and bool(a[adapter].weight.any()) and bool(b[adapter].weight.any()):
                return True
    return False


def _image_distance(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a.float() - b.float())
    mse = float(diff.pow(2).mean())
    return {"mean_abs_diff": float(diff.abs().mean()), "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse)}


def _effect(images: torch.Tensor, base: torch.Tensor, floor: dict, samples: int) -> dict:
    out = _image_distance(images, base)
    return {**out, "noise_floor_mean_abs_diff": floor["mean_abs_diff"], "samples": samples}


def apply_loras(model, specs: Sequence[LoraSpec | str], check: EffectCheck | None = None) -> LoraSet | None:
    """Loads each LoRA with diffusers' `load_lora_weights`, checks it, and fuses them all into the pipeline.

    Every LoRA must match modules of the pipeline (all the modules its file names, when that can be counted) and
    change the fused weights; with `check`, its reference images must also differ from the base model's by more
    than the base model's re-run does (the noise floor). A LoRA that fails is refused with one line naming it and
    what it matched.

    Args:
        model (`LoadedModel`): the pipeline, on its device; changed in place (the run owns it).
        specs (`Sequence[LoraSpec | str]`): the LoRAs, fused in this order.
        check (`EffectCheck`, *optional*): measure each LoRA's effect on the run's reference images.

    Returns:
        `LoraSet`, or None without LoRAs.
    """
    specs = [LoraSpec.coerce(s) for s in specs]
    if not specs:
        return None
    if not _has_peft():
        raise QschedError("--lora needs the peft package (diffusers loads LoRAs through it): pip install 'peft>=0.17'")
    pipe, denoiser_name = model.pipe, model.family.denoiser
    if not hasattr(pipe, "load_lora_weights"):
        raise QschedError(f"--lora: pipeline {type(pipe).__name__} cannot load LoRAs (diffusers gives it no "
                          "load_lora_weights); use a pipeline class with a LoRA loader")
    held = [c for c in _lora_components(pipe) if _tuner_layers(getattr(pipe, c))]
    if held:
        raise QschedError(f"the pipeline already holds LoRA layers in its {', '.join(held)}; pass each LoRA with --lora "
                          "to a freshly loaded model (or use apply_schedule, which fuses the LoRAs a pipeline holds)")
    base = floor = None
    if check is not None:
        from qsched_search.pipeline.rollout import EvalSet, run_pipeline

        n = min(check.samples, len(check.eval_set))
        subset = EvalSet(check.eval_set.prompts[:n], check.eval_set.seeds[:n])

        def reference_images() -> torch.Tensor:
            return run_pipeline(model, check.steps, subset, check.batch_size, check.call_kwargs)

        base = reference_images()
        floor = _image_distance(reference_images(), base)
    loaded: list[LoadedLora] = []
    for k, spec in enumerate(specs):
        path = resolve_lora_file(spec.source)
        tensors, sha = read_lora_file(path)
        adapter = f"qsched{k}"
        try:
            pipe.load_lora_weights(dict(tensors), adapter_name=adapter)
        except Exception as exc:  # diffusers and peft raise ValueError, RuntimeError (shapes), KeyError...
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            if "not found in the base model" in str(exc):  # peft: none of the file's target modules exists here
                raise QschedError(f"--lora {spec.source} matched no module of {type(pipe).__name__} "
                                  f"({', '.join(_lora_components(pipe))}): its target modules, such as "
                                  f"{next(iter(tensors))!r}, are not in the model; it is a LoRA for another model") from None
            raise QschedError(f"--lora {spec.source}: diffusers could not load it into {type(pipe).__name__} "
                              f"({reason}); is it a LoRA for another model?") from None
        expected = sum(1 for key in tensors if _DOWN_KEY.search(key))
        matched = _matched(pipe, adapter)
        lora = LoadedLora(spec, str(path), sha, adapter, len(tensors), expected, matched)
        what = ", ".join(f"{c} {n}" for c, n in matched.items()) or "none"
        if not matched:
            example = next(iter(tensors))
            raise QschedError(f"--lora {spec.source} matched no module of {type(pipe).__name__} ({', '.join(_lora_components(pipe))}): "
                              f"its {len(tensors)} tensors name modules such as {example!r}; it is a LoRA for another "
                              "model or in a format diffusers does not read")
        if expected and sum(matched.values()) < expected:
            raise QschedError(f"--lora {spec.source} matched only {sum(matched.values())} of the {expected} modules its "
                              f"file adapts ({what}); it is a LoRA for another variant of this model")
        if not _changes_weights(pipe, adapter):
            raise QschedError(f"--lora {spec.source} changes nothing: in every one of its {sum(matched.values())} "
                              f"matched modules ({what}) its A or B matrix is all zero, so fusing it is a no-op")
        if check is not None:
            pipe.set_adapters([adapter], [spec.scale])
            lora.effect = _effect(reference_images(), base, floor, len(base))
            if not lora.effect["mean_abs_diff"] > floor["mean_abs_diff"]:
                raise QschedError(f"--lora {spec.source} changes nothing visible: its reference images differ from the "
                                  f"base model's by {lora.effect['mean_abs_diff']:.3g} (mean |pixel difference| over "
                                  f"{len(base)} samples), not more than the noise floor {floor['mean_abs_diff']:.3g}; "
                                  f"it matched {what} at scale {spec.scale:g}")
        loaded.append(lora)
    pipe.set_adapters([lora.adapter for lora in loaded], [lora.spec.scale for lora in loaded])
    fused = fuse_loaded_loras(pipe, denoiser_name)
    denoiser = getattr(pipe, denoiser_name)
    lora_set = LoraSet(loaded, fused, modules_sha256(denoiser, fused.modules) or "")
    if check is not None:
        lora_set.effect = _effect(reference_images(), base, floor, len(base))
    logger.info("fused %d LoRA(s) into %d modules of the %s: %s", len(loaded), len(fused.modules), denoiser_name,
                lora_set.describe())
    return lora_set


def lora_mismatch(recorded: dict | None, denoiser: torch.nn.Module, fused: FusedLoras | None,
                  denoiser_name: str = "denoiser") -> str | None:
    """One line when a pipeline's LoRAs are not those a schedule was measured with; None when they are.

    The schedule's `loras` section records the denoiser modules its LoRAs changed and the sha256 of their fused
    weights: the pipeline matches when those modules hold the same bits (however its LoRAs got there) and no other
    module carries a LoRA.

    Args:
        recorded (`dict`, *optional*): the schedule's `loras` section (None: measured without LoRAs).
        denoiser (`nn.Module`): the pipeline's denoiser, with its LoRAs fused (`fuse_loaded_loras`).
        fused (`FusedLoras`, *optional*): what `fuse_loaded_loras` found on the pipeline.
    """
    have = f"adapter(s) {', '.join(fused.adapters)} on {len(fused.modules)} modules" if fused else "no LoRA adapters"
    if not recorded:
        if fused is None:
            return None
        return (f"this pipeline has LoRA {have} of its {denoiser_name}; the schedule was measured without LoRAs: "
                "expect other images and per-step sensitivities than the search measured")
    names = list(recorded.get("modules") or [])
    same = modules_sha256(denoiser, names) == recorded.get("modules_sha256")
    extra = sorted(set(fused.modules) - set(names)) if fused else []
    if same and not extra:
        return None
    wanted = ", ".join(f"{a.get('id')} (scale {a.get('scale'):g}, sha256 {str(a.get('sha256'))[:12]})"
                       for a in recorded.get("adapters") or [])
    why = "its weights in the LoRA's modules differ" if not same else f"LoRA layers on {len(extra)} other modules"
    return (f"the schedule was measured with LoRA {wanted}; this pipeline has {have} ({why}): expect other images "
            "than the search measured; load the same LoRA at the same scale (pipe.load_lora_weights)")
