"""Builds what every command needs from its settings: the model, the bank, the runner and the metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from qsched_search.errors import QschedError
from qsched_search.eval.evaluate import ScheduleEvaluator
from qsched_search.pipeline.loading import LoadedModel, load_model
from qsched_search.pipeline.prefix_cache import PrefixCache
from qsched_search.pipeline.lora import EffectCheck, LoraSpec, apply_loras
from qsched_search.pipeline.rollout import EvalSet, Runner, capture_denoiser_call, make_eval_set
from qsched_search.quant.backends import build_bank, check_levels, resolve_backend
from qsched_search.quant.bank import COMPILE_MODES, Bank
from qsched_search.quant.levels import Menu, load_menu

__all__ = ["RunSettings", "Session", "open_session", "read_prompts"]


@dataclass(frozen=True)
class RunSettings:
    """The settings shared by probe, search, calibrate and generate. Everything here decides the numbers a run produces.

    Args:
        model (`str`): "embedded", a local pipeline folder or a hub id.
        steps (`int`): denoising steps.
        precisions (`tuple[str]`): the lower levels to probe or search over.
        reference (`str`): the pipeline's own level; defaults to the dtype's reference level.
        samples (`int`): evaluation samples per schedule.
        seed (`int`): sample k uses seed + k.
        prompts (`tuple[str]`): cycled over the samples; the family's default prompts if empty.
        metrics (`tuple[str]`): the family's default metrics if empty.
        device (`str`), dtype (`str`): where and in which dtype the pipeline runs.
        backend (`str`, defaults to `"auto"`): `sim` (simulated rounding), `torchao` (real kernels, CUDA) or `auto`
            (torchao on a CUDA device, sim elsewhere).
        compile (`str`, *optional*): the real-kernel bank's compile scope; it also decides which layers a level
            quantizes in the simulation. The model's repeated blocks if it declares them, else the whole model.
        cuda_graphs (`bool`, defaults to False): replay each level as one CUDA graph (torchao backend).
        family (`str`, *optional*): a file in configs/families; detected from the pipeline if None.
        loras (`tuple[LoraSpec]`, *optional*): LoRAs (specs or `PATH_OR_ID[:SCALE]` strings) fused into the pipeline,
            in this order, before the bank is built; each is checked to take effect (`qsched_search.pipeline.lora`).
    """

    model: str = "embedded"
    steps: int = 4
    precisions: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")
    reference: str = "fp32"
    samples: int = 64
    seed: int = 0
    prompts: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64
    menu: str | None = None
    weights_dir: str | None = None
    call_kwargs: dict = field(default_factory=dict)
    family: str | None = None
    backend: str = "auto"
    compile: str | None = None
    cuda_graphs: bool = False
    loras: tuple[LoraSpec, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "loras", tuple(LoraSpec.coerce(x) for x in self.loras))
        if self.steps < 1:
            raise QschedError(f"--steps must be at least 1, got {self.steps}")
        if self.samples < 1:
            raise QschedError(f"--samples must be at least 1, got {self.samples}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise QschedError(f"--device {self.device} asked for, but no CUDA device is visible; use --device cpu")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise QschedError(f"--compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        object.__setattr__(self, "backend", resolve_backend(self.backend, self.device))


@dataclass
class Session:
    settings: RunSettings
    model: LoadedModel
    menu: Menu
    bank: Bank
    eval_set: EvalSet
    runner: Runner
    evaluator: ScheduleEvaluator
    metric_names: list[str]
    calibration: tuple = ((), {})  # the recorded denoiser call (args, kwargs): shapes for latency and profiles

    def describe(self) -> dict:
        """Settings and derived facts for manifests and fingerprints.

        `loras` (each LoRA's id, file sha256 and scale) is there only for a run with LoRAs, so fingerprints of runs
        without them are those of earlier versions.
        """
        settings = asdict(self.settings)
        settings.pop("loras")
        loras = {"loras": self.model.loras.fingerprint()} if self.model.loras is not None else {}
        return {
            **settings,
            **loras,
            "model_id": self.model.model_id,
            "weights_sha256": self.model.weights_sha256(),
            "family": self.model.family.family,
            "prompts_sha256": self.eval_set.sha256(),
            "metrics": self.metric_names,
            "levels": {name: self.menu.to_dict()["levels"][name] for name in self.bank.levels},
            "exclude": list(self.model.family.exclude) + list(self.menu.extra_exclude),
            "execution": self.bank.describe(),
        }

    def lora_record(self) -> dict | None:
        """The `loras` section of schedule.json and manifests (each LoRA's id, sha256, scale, matched modules and
        measured effect; the fused modules' sha256), or None for a run without LoRAs."""
        return None if self.model.loras is None else self.model.loras.to_dict()

    def close(self) -> None:
        self.bank.remove()


def open_session(settings: RunSettings, keep_images: bool = False, metrics: bool = True, menu: Menu | None = None,
                 layers: dict | None = None, prefix_cache_mb: float | None = None,
                 lora_check: bool = True) -> Session:
    """Loads the model, records one denoiser call, builds the bank and the metrics; checks names before heavy work.

    Args:
        settings (`RunSettings`): what to run.
        keep_images (`bool`, defaults to False): keep each evaluation's images.
        metrics (`bool`, defaults to True): build the metrics (False for generate and profile).
        menu (`Menu`, *optional*): overrides `settings.menu` (a schedule file carries the menu it was searched with).
        layers (`dict`, *optional*): level -> module names, as a schedule recorded them (see `Bank`).
        prefix_cache_mb (`float`, *optional*): memory for reused denoising prefixes (`PrefixCache`), in MiB; 0 turns
            reuse off; None sizes it from the first schedule run. Not a setting: reuse never changes a number.
        lora_check (`bool`, defaults to True): measure each of `settings.loras` on the run's first reference images
            and refuse one that changes nothing (False: only the weight checks, no pipeline runs).
    """
    if prefix_cache_mb is not None and not prefix_cache_mb >= 0:
        raise QschedError(f"--prefix-cache-mb {prefix_cache_mb} is negative; pass 0 to turn prefix reuse off")
    menu = menu or load_menu(settings.menu)
    levels = list(dict.fromkeys([settings.reference, *settings.precisions]))
    menu.select(levels)
    if not menu[settings.reference].runs_as_is(settings.dtype):
        raise QschedError(f"--reference {settings.reference!r} would round a {settings.dtype} pipeline; pass a level that "
                          f"runs it as it is (format 'reference', or a cast to {settings.dtype}) from {menu.source}")
    check_levels(settings.backend, menu, levels, settings.dtype)
    if metrics and settings.metrics:
        from qsched_search.eval.metrics import get_metric_class

        for name in settings.metrics:  # fail on a typo before the model loads
            get_metric_class(name)
    model = load_model(settings.model, device=settings.device, dtype=settings.dtype, family=settings.family)
    metric_names = list(settings.metrics or model.family.metrics)
    metric_objs = []
    if metrics:
        from qsched_search.eval.metrics import build_metrics

        metric_objs = build_metrics(metric_names, device=settings.device, weights_dir=settings.weights_dir)
    prompts = list(settings.prompts or model.family.default_prompts)
    eval_set = make_eval_set(prompts, settings.samples, settings.seed)
    # Fused before the bank is built: a LoRA loaded into quantized layers fails or does nothing.
    check = EffectCheck(settings.steps, eval_set, settings.batch_size, settings.call_kwargs) if lora_check else None
    model.loras = apply_loras(model, settings.loras, check=check)
    call_kwargs = {**model.family.call_defaults, **settings.call_kwargs}
    batch = list(eval_set.prompts[: settings.batch_size])
    # One call at the evaluation's batch size: its row counts decide which layers activation-quantizing levels take.
    calibration = capture_denoiser_call(model.pipe, model.denoiser, {**call_kwargs, "prompt": batch,
                                                                     "num_inference_steps": settings.steps})
    bank = build_bank(settings.backend, model.denoiser, menu, levels[1:], settings.reference, list(model.family.exclude),
                      calibration=calibration, compile=settings.compile, cuda_graphs=settings.cuda_graphs, layers=layers)
    cache = PrefixCache(None if prefix_cache_mb is None else int(prefix_cache_mb * 2**20))
    runner = Runner(model, bank, settings.steps, eval_set, settings.batch_size, settings.call_kwargs, prefix_cache=cache)
    evaluator = ScheduleEvaluator(runner, metric_objs, keep_images=keep_images)
    return Session(replace(settings, compile=bank.compile), model, menu, bank, eval_set, runner, evaluator, metric_names,
                   calibration)


def read_prompts(value: str | None) -> tuple[str, ...]:
    """`--prompts`: comma-separated prompts, or @FILE with one prompt per line."""
    if not value:
        return ()
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise QschedError(f"prompts file {str(path)!r} not found; pass --prompts 'a,b' or @FILE with one prompt per line")
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return tuple(p.strip() for p in value.split(",") if p.strip())
