"""Learns Q-Sched coefficients for a quantized schedule: an Optuna study over (m, s) or per-step factors on calibration samples."""

from __future__ import annotations

import logging
import math
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
import torch

from qsched_search._version import __version__
from qsched_search.coefficients import Coefficients, apply_coefficients
from qsched_search.errors import QschedError
from qsched_search.evaluate import MAX_UNHEALTHY_FRACTION
from qsched_search.rollout import EvalSet, RolloutResult, Runner

__all__ = [
    "CALIBRATION_SEED_OFFSET",
    "COEFFICIENTS_FILE",
    "TRIALS_FILE",
    "DEFAULT_RANGE",
    "LOSSES",
    "OBJECTIVES",
    "PARAMS",
    "SAMPLERS",
    "CalibrationResult",
    "CalibrationSettings",
    "ClipJaq",
    "JudgeJaq",
    "Objective",
    "ReferenceLpips",
    "build_objective",
    "calibration_set",
    "calibrate",
    "coefficients_from_params",
    "evaluations_to_reach",
    "register_objective",
    "schedule_with_coefficients",
]

logger = logging.getLogger(__name__)

# Calibration sample k uses seed + CALIBRATION_SEED_OFFSET + k; evaluation sample k uses seed + k (make_eval_set),
# so the two never share a seed for fewer than a million evaluation samples.
CALIBRATION_SEED_OFFSET = 10**6
DEFAULT_RANGE = (0.8, 1.2)  # the published search range of m and s
# What `qsched calibrate` writes beside ResultsDir's schedule.json and manifest.json.
COEFFICIENTS_FILE = "coefficients.json"
TRIALS_FILE = "calibration_trials.csv"
LOSSES = ("jaq", "reference")
PARAMS = ("ramp", "per-step")
SAMPLERS = ("tpe", "grid", "random")
# A log of a CLIPScore of 0 (possible with a poor model) would be -inf; scores are clamped to this first.
_MIN_CLIP_SCORE = 1e-6


# ================================================================================================ objectives


class Objective(ABC):
    """A calibration loss turned into a score to maximise, over one batch of calibration images.

    Subclasses set `needs_reference` (True: `score` gets the full-precision images of the same prompts and seeds)
    and `description` (a sentence for result files); `name` is set by `register_objective`.
    """

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None) -> dict[str, float]:
        """Scores calibration images.

        Args:
            images (`torch.Tensor`): float (N, C, H, W) in [0, 1], unusable images already left out.
            prompts (`Sequence[str]`): the prompt of each image.
            reference (`torch.Tensor`, *optional*): the full-precision images, when `needs_reference`.

        Returns:
            `dict[str, float]`: `value` (higher is better) and its parts, for trials.csv.
        """

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "needs_full_precision": self.needs_reference}


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: registers an `Objective` under `name`."""

    def decorator(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise QschedError(f"objective name {name!r} is already registered to {OBJECTIVES[name].__name__}")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return decorator


@register_objective("jaq-judge")
class JudgeJaq(Objective):
    """Reference-free JAQ for the embedded Fashion-MNIST model: alignment + k * quality, from the in-domain judge.

    alignment = mean over images of log p_judge(prompted class | image): the in-domain stand-in for log CLIPScore,
    a text-image compatibility that needs no full-precision image.

    quality = -log FD(judge features of the batch, real Fashion-MNIST statistics): the Frechet distance of the
    batch's judge features to the shipped statistics of the 10,000 real test images (`real_stats.npz`). Like
    CLIP-IQA it is learned from real images only and needs no full-precision inference; unlike a per-image score
    (CLIP-IQA, or a per-image likelihood under the real Gaussian) it also falls when the sampler loses diversity, so
    a factor that pulls every image to the class mean is not rewarded. The log makes the term scale-free (a 10%
    lower distance counts the same at any level). With the few hundred calibration images the distance carries a
    positive small-sample bias, the same for every trial (the same seeds every trial), so it ranks settings; it is
    not comparable with a distance over another number of images. Caveat: the `judge_fd` evaluation metric uses the
    same feature space, so gains on it are partly by construction; FID (Inception features) and LPIPS are the
    independent checks.

    Args:
        k (`float`, defaults to 1.0): the weight of the quality term.
        device (`str`, defaults to `"cpu"`): where the judge runs.
    """

    description = ("alignment = mean log p_judge(prompted class); quality = -log judge-feature Frechet distance of "
                   "the batch to the real Fashion-MNIST test statistics; value = alignment + k * quality")

    def __init__(self, k: float = 1.0, device: str = "cpu", weights_dir: str | Path | None = None):
        from qsched_search.metrics import JudgeFrechetDistance

        self.k = float(k)
        self.fd = JudgeFrechetDistance(device=device, weights_dir=weights_dir)
        mu, sigma = self.fd.reference_stats()
        self._mu, self._root, self._trace = mu, _sqrt_psd(sigma), float(np.trace(sigma))

    def score(self, images, prompts, reference=None) -> dict[str, float]:
        from qsched_search.embedded.vocab import CLASS_NAMES
        from qsched_search.metrics import frechet_eig

        unknown = sorted({p for p in prompts if p not in CLASS_NAMES})
        if unknown:
            raise QschedError(f"--loss jaq on the embedded model needs Fashion-MNIST class names as calibration "
                              f"prompts, got {unknown[:3]}; allowed: {', '.join(CLASS_NAMES)}")
        labels = torch.tensor([CLASS_NAMES.index(p) for p in prompts])
        feats, logits = self.fd.judge_outputs(images)
        logp = torch.log_softmax(logits.double(), dim=1)[torch.arange(len(labels)), labels]
        fd = max(frechet_eig(feats.numpy(), self._mu, self._root, self._trace), 1e-12)
        alignment = float(logp.mean())
        quality = -math.log(fd)
        return {"value": alignment + self.k * quality, "alignment": alignment, "quality": quality, "fd": fd,
                "accuracy": float((logits.argmax(1) == labels).double().mean())}

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k}


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


@register_objective("jaq-clip")
class ClipJaq(Objective):
    """The published JAQ: log(CLIPScore) + k * mean CLIP-IQA "quality", both torchmetrics, from a local CLIP folder.

    The paper's CLIP-IQA uses piq's CLIP-IQA weights (downloaded at first use); offline, both terms use the CLIP
    model in `clip_model` (a folder written by `CLIPModel.save_pretrained` with its processor), passed to
    torchmetrics as a loader, so nothing is fetched.

    Args:
        clip_model (`str` or `Path`): the local CLIP folder (model and processor).
        k (`float`, defaults to 2.0): the weight of the quality term (the paper's k = 2).
        device (`str`, defaults to `"cpu"`): where CLIP runs.
    """

    description = "log(torchmetrics CLIPScore) + k * mean(torchmetrics CLIPImageQualityAssessment 'quality')"

    def __init__(self, clip_model: str | Path, k: float = 2.0, device: str = "cpu", weights_dir=None):
        from torchmetrics.multimodal import CLIPImageQualityAssessment, CLIPScore

        folder = Path(clip_model).expanduser()
        if not (folder / "config.json").is_file():
            raise QschedError(f"--clip-model {str(folder)!r} is not a CLIP folder (no config.json); pass a folder "
                              "written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
        self.k, self.folder, self.device = float(k), folder, torch.device(device)

        def load():
            from transformers import CLIPModel, CLIPProcessor

            try:
                return (_ClipFeatures(CLIPModel.from_pretrained(folder, local_files_only=True)),
                        CLIPProcessor.from_pretrained(folder, local_files_only=True))
            except (OSError, ValueError) as exc:
                raise QschedError(f"--clip-model {str(folder)!r} could not be loaded: {str(exc).splitlines()[0][:160]}; "
                                  "it needs the model and its processor files") from None

        # torchmetrics takes a loader in place of a hub name: a local folder, nothing fetched.
        self.clip_score = CLIPScore(model_name_or_path=load).to(self.device)
        self.clip_iqa = CLIPImageQualityAssessment(model_name_or_path=load, prompts=("quality",)).to(self.device)

    @staticmethod
    def _to_255(images: torch.Tensor) -> torch.Tensor:
        # Both metrics hand images to the CLIP processor, which rescales by 1/255: give them 0..255.
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return (images.float() * 255).clamp(0, 255)

    @torch.no_grad()
    def score(self, images, prompts, reference=None) -> dict[str, float]:
        x = self._to_255(images).to(self.device)
        self.clip_score.reset()
        self.clip_iqa.reset()
        self.clip_score.update(x, list(prompts))
        clip = float(self.clip_score.compute())
        # data_range 1 keeps torchmetrics from dividing the 0..255 images before the processor's own 1/255.
        self.clip_iqa.data_range = 1.0
        self.clip_iqa.update(x)
        iqa = self.clip_iqa.compute().reshape(-1).double()
        alignment = math.log(max(clip, _MIN_CLIP_SCORE))
        quality = float(iqa.mean())
        return {"value": alignment + self.k * quality, "alignment": alignment, "quality": quality, "clip_score": clip}

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k, "clip_model": str(self.folder)}


class _ClipFeatures(torch.nn.Module):
    """A CLIP model whose get_text_features / get_image_features return tensors.

    transformers 5 returns a model output there (the projected features in `pooler_output`); torchmetrics 1.9
    divides the result by its norm and needs the tensor.
    """

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))


@register_objective("reference")
class ReferenceLpips(Objective):
    """The baseline that Q-Sched avoids: match the full-precision images, value = -mean LPIPS to them.

    Needs one full-precision run of the calibration samples (made once per calibration).
    """

    needs_reference = True
    description = "value = -mean LPIPS (AlexNet, v0.1 heads) to the full-precision images of the same prompts and seeds"

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None, **_):
        from qsched_search.metrics import LpipsMetric

        self.lpips = LpipsMetric(device=device, weights_dir=weights_dir)

    def score(self, images, prompts, reference=None) -> dict[str, float]:
        if reference is None:
            raise QschedError("the reference loss needs the full-precision calibration images; none were made")
        lp = float(self.lpips.per_image(images, reference).double().mean())
        return {"value": -lp, "lpips": lp}


def build_objective(loss: str, family: str, *, k: float | None = None, clip_model: str | None = None,
                    device: str = "cpu", weights_dir: str | None = None) -> Objective:
    """The objective of `--loss` for a model family.

    `jaq` is the in-domain judge's JAQ for the embedded model and CLIP's JAQ (needs `clip_model`) for any family;
    `reference` is LPIPS to full precision.
    """
    if loss not in LOSSES:
        raise QschedError(f"--loss {loss!r} is unknown; allowed: {', '.join(LOSSES)}")
    if loss == "reference":
        return ReferenceLpips(device=device, weights_dir=weights_dir)
    if clip_model:
        return ClipJaq(clip_model, k=2.0 if k is None else k, device=device)
    if family == "embedded":
        return JudgeJaq(k=1.0 if k is None else k, device=device, weights_dir=weights_dir)
    raise QschedError(f"--loss jaq on model family {family!r} needs a CLIP model: pass --clip-model DIR (a local folder "
                      "written by CLIPModel.save_pretrained with its processor), or use --loss reference")


# ================================================================================================ settings


@dataclass(frozen=True)
class CalibrationSettings:
    """How coefficients are learned. Everything here decides the result.

    Args:
        loss (`str`, defaults to `"jaq"`): `jaq` (reference-free) or `reference` (LPIPS to full precision).
        param (`str`, defaults to `"ramp"`): `ramp` (the published two scalars m, s) or `per-step` (2 x steps values).
        trials (`int`, defaults to 40): sampler evaluations, after the identity baseline (which is always measured).
        sampler (`str`, defaults to `"tpe"`): `tpe` (Optuna TPE, multivariate), `random`, or `grid` (the published
            search: `grid_points` values per axis over the range; ramp only; `trials` is then the grid's size).
        low (`float`), high (`float`): the range of every factor; defaults to the published [0.8, 1.2].
        grid_points (`int`, defaults to 10): values per axis for `grid`.
        k (`float`, *optional*): the JAQ quality weight; 1 for the judge, 2 (the paper's) for CLIP if None.
        prompts (`tuple[str]`): the calibration prompts, cycled over the samples (required by `calibrate`).
        samples (`int`, defaults to 200): calibration samples per trial.
        seed (`int`, defaults to 0): calibration sample j uses seed + CALIBRATION_SEED_OFFSET + j; the sampler's seed.
        clip_model (`str`, *optional*): a local CLIP folder, for `jaq` on families other than the embedded one.
    """

    loss: str = "jaq"
    param: str = "ramp"
    trials: int = 40
    sampler: str = "tpe"
    low: float = DEFAULT_RANGE[0]
    high: float = DEFAULT_RANGE[1]
    grid_points: int = 10
    k: float | None = None
    prompts: tuple[str, ...] = ()
    samples: int = 200
    seed: int = 0
    clip_model: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.loss not in LOSSES:
            raise QschedError(f"--loss {self.loss!r} is unknown; allowed: {', '.join(LOSSES)}")
        if self.param not in PARAMS:
            raise QschedError(f"--param {self.param!r} is unknown; allowed: {', '.join(PARAMS)}")
        if self.sampler not in SAMPLERS:
            raise QschedError(f"--sampler {self.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        if self.sampler == "grid" and self.param != "ramp":
            raise QschedError("--sampler grid searches the published two-scalar ramp only; use --param ramp, or "
                              "--sampler tpe for per-step values")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 0:
            raise QschedError(f"--trials {self.trials!r} is invalid; allowed: 0 or more evaluations")
        if not (0 < self.low < self.high) or not math.isfinite(self.high):
            raise QschedError(f"--range {self.low:g},{self.high:g} is invalid; allowed: 0 < low < high, e.g. 0.8,1.2")
        if self.grid_points < 2:
            raise QschedError(f"--grid-points {self.grid_points} is too few; allowed: 2 or more values per axis")
        if self.samples < 2:
            raise QschedError(f"--calib-samples {self.samples} is too few; allowed: 2 or more calibration samples")
        if self.k is not None and not (math.isfinite(self.k) and self.k >= 0):
            raise QschedError(f"--k {self.k!r} is invalid; allowed: a number >= 0 (the weight of the quality term)")

    @property
    def evaluations(self) -> int:
        """Calibration runs this asks for, the identity baseline included."""
        return 1 + (self.grid_points**2 if self.sampler == "grid" else self.trials)


def calibration_set(prompts: Sequence[str], samples: int, seed: int) -> EvalSet:
    """`samples` calibration samples cycling through `prompts`; sample j seeded with seed + CALIBRATION_SEED_OFFSET + j."""
    if not prompts:
        raise QschedError("no calibration prompts given")
    base = seed + CALIBRATION_SEED_OFFSET
    return EvalSet(tuple(prompts[j % len(prompts)] for j in range(samples)), tuple(base + j for j in range(samples)))


def coefficients_from_params(params: Mapping[str, float], param: str, steps: int) -> Coefficients:
    """Optuna parameters -> coefficients: `m`, `s` for a ramp; `m_i`, `s_i` (i < steps) for per-step values."""
    if param == "ramp":
        return Coefficients.from_ramp(params["m"], params["s"], steps)
    return Coefficients.per_step([params[f"m_{i}"] for i in range(steps)], [params[f"s_{i}"] for i in range(steps)])


# ================================================================================================ the study


@dataclass
class CalibrationResult:
    """What `calibrate` found. `coefficients` is the identity when no trial beat it on the calibration objective."""

    coefficients: Coefficients
    best: dict  # the objective's parts at the chosen coefficients
    baseline: dict  # the objective's parts at the identity (the stock sampler)
    trials: pd.DataFrame
    evaluations: int
    seconds: float
    settings: CalibrationSettings
    objective: dict
    levels: tuple[str, ...]
    timesteps: list[int]

    @property
    def gain(self) -> float:
        """Objective value gained over the identity on the calibration samples (>= 0 by construction)."""
        return float(self.best["value"] - self.baseline["value"])


class _TrialFailed(Exception):
    pass


def calibrate(runner: Runner, levels: Sequence[str], settings: CalibrationSettings, objective: Objective, *,
              reference_levels: Sequence[str] | None = None, eval_seeds: Sequence[int] = (),
              on_trial: Callable[[dict], None] | None = None) -> CalibrationResult:
    """Learns coefficients for `levels` (one per step) on calibration samples.

    Every trial runs the same calibration prompts and seeds (common random numbers), so trials differ only by their
    coefficients. The identity is measured first, outside the sampler's budget, and kept if nothing beats it.

    Args:
        runner (`Runner`): the model, its bank and steps; a runner over the calibration samples is made from it
            (the runner itself and its evaluation set are left as they are).
        levels (`Sequence[str]`): the precision schedule, one level per step.
        settings (`CalibrationSettings`): loss, parametrisation, sampler, trials, prompts, seeds.
        objective (`Objective`): from `build_objective`.
        reference_levels (`Sequence[str]`, *optional*): the full-precision schedule, for objectives that need it;
            all steps at the bank's reference if None.
        eval_seeds (`Sequence[int]`): seeds the results will be evaluated on; a calibration seed among them is an error.
        on_trial (`Callable[[dict], None]`, *optional*): called with each trials.csv row (progress bars).

    Returns:
        `CalibrationResult`.
    """
    started = time.perf_counter()
    if not settings.prompts:
        raise QschedError("no calibration prompts; pass --prompts (the calibration prompt pool) and --calib-prompts K")
    levels = tuple(levels)
    steps = runner.steps
    if len(levels) != steps:
        raise QschedError(f"schedule has {len(levels)} levels for {steps} steps; give one level per step")
    calib = calibration_set(settings.prompts, settings.samples, settings.seed)
    shared = sorted(set(calib.seeds) & set(eval_seeds))
    if shared:
        raise QschedError(f"calibration seeds {shared[:3]}... are also evaluation seeds; calibration sample j uses "
                          f"seed + {CALIBRATION_SEED_OFFSET} + j: evaluate with fewer than {CALIBRATION_SEED_OFFSET} "
                          "samples or another --seed")
    crunner = Runner(runner.model, runner.bank, steps, calib, runner.batch_size, runner.call_kwargs)
    reference = None
    if objective.needs_reference:
        ref_levels = tuple(reference_levels or (runner.bank.reference,) * steps)
        reference = crunner.run(ref_levels)
        if any(p is not None for p in reference.problems):
            raise QschedError("the full-precision calibration run made unusable images; check the model and prompts")

    timesteps: list[int] = []

    def evaluate(coeffs: Coefficients) -> dict:
        with apply_coefficients(runner.model.pipe, coeffs):
            result = crunner.run(levels)
        timesteps[:] = result.timesteps
        return _score(objective, result, calib, reference)

    rows: list[dict] = []
    baseline = evaluate(Coefficients.identity(steps))
    if baseline.get("fail_reason"):
        raise QschedError(f"the quantized schedule {','.join(levels)} without coefficients already fails on the "
                          f"calibration samples ({baseline['fail_reason']}); coefficients cannot be calibrated from it")
    best_value = baseline["value"]
    identity_params = ({"m": 1.0, "s": 1.0} if settings.param == "ramp"
                       else {**{f"m_{i}": 1.0 for i in range(steps)}, **{f"s_{i}": 1.0 for i in range(steps)}})
    rows.append(_row(0, "identity", identity_params, baseline, best_value))
    if on_trial:
        on_trial(rows[-1])

    def objective_fn(trial: optuna.Trial) -> float:
        nonlocal best_value
        params = _suggest(trial, settings, steps)
        t0 = time.perf_counter()
        try:
            parts = evaluate(coefficients_from_params(params, settings.param, steps))
        except QschedError:
            raise
        except Exception as exc:  # a numeric error of one setting must not end the study
            parts = {"value": math.nan, "fail_reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        parts["seconds"] = round(time.perf_counter() - t0, 3)
        if not parts.get("fail_reason"):
            best_value = max(best_value, parts["value"])
        rows.append(_row(len(rows), settings.sampler, params, parts, best_value))
        if on_trial:
            on_trial(rows[-1])
        if parts.get("fail_reason"):
            raise _TrialFailed(parts["fail_reason"])
        return parts["value"]

    n_trials = settings.grid_points**2 if settings.sampler == "grid" else settings.trials
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would bury the progress bar
    try:
        if n_trials:
            _run_study(objective_fn, settings, steps, n_trials, identity_params, baseline["value"])
    finally:
        optuna.logging.set_verbosity(verbosity)
    trials = pd.DataFrame(rows)
    ok = trials[trials.fail_reason.isna()] if "fail_reason" in trials else trials
    best_row = ok.loc[ok.value.idxmax()]
    if best_row.source == "identity":
        chosen = Coefficients.identity(steps)
    else:
        chosen = coefficients_from_params({k: best_row[k] for k in identity_params}, settings.param, steps)
    best = {k: _plain(best_row[k]) for k in best_row.index if k in baseline or k == "value"}
    result_objective = objective.describe()
    calibration = {
        "loss": settings.loss,
        "objective": result_objective,
        "param": settings.param,
        "sampler": settings.sampler,
        "trials": int(len(trials) - 1),
        "evaluations": int(len(trials)),
        "range": [settings.low, settings.high],
        "grid_points": settings.grid_points if settings.sampler == "grid" else None,
        "levels": list(levels),
        "prompts": sorted(set(calib.prompts)),
        "samples": len(calib),
        "seeds": {"first": calib.seeds[0], "last": calib.seeds[-1], "rule": f"seed + {CALIBRATION_SEED_OFFSET} + j"},
        "calibration_sha256": calib.sha256(),
        "value": float(best["value"]),
        "identity_value": float(baseline["value"]),
        "full_precision_inference": objective.needs_reference,
        "tool_version": __version__,
    }
    return CalibrationResult(coefficients=chosen.with_calibration(calibration), best=best,
                             baseline={k: _plain(v) for k, v in baseline.items()}, trials=trials,
                             evaluations=int(len(trials)), seconds=time.perf_counter() - started,
                             settings=settings, objective=result_objective, levels=levels, timesteps=list(timesteps))


def _run_study(objective_fn, settings: CalibrationSettings, steps: int, n_trials: int, identity_params: dict,
               identity_value: float) -> None:
    study = optuna.create_study(direction="maximize", sampler=_sampler(settings, steps))
    if settings.sampler == "tpe" and settings.low <= 1.0 <= settings.high:
        # The identity is already measured: tell TPE, so that its model starts from the stock sampler.
        dist = optuna.distributions.FloatDistribution(settings.low, settings.high)
        study.add_trial(optuna.trial.create_trial(params=identity_params, value=identity_value,
                                                  distributions={k: dist for k in identity_params}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective_fn, n_trials=n_trials, catch=(_TrialFailed,), gc_after_trial=False)


def _score(objective: Objective, result: RolloutResult, calib: EvalSet, reference: RolloutResult | None) -> dict:
    healthy = result.healthy
    bad = int((~healthy).sum())
    if bad > MAX_UNHEALTHY_FRACTION * len(healthy):
        kinds = sorted({p for p in result.problems if p})
        return {"value": math.nan, "unhealthy": bad, "fail_reason": f"{bad}/{len(healthy)} images unusable ({', '.join(kinds)})"}
    prompts = [p for p, ok in zip(calib.prompts, healthy.tolist()) if ok]
    parts = objective.score(result.images[healthy], prompts, None if reference is None else reference.images[healthy])
    if not math.isfinite(parts["value"]):
        return {**parts, "value": math.nan, "unhealthy": bad, "fail_reason": "objective is NaN or infinite"}
    return {**parts, "unhealthy": bad}


def _suggest(trial: optuna.Trial, settings: CalibrationSettings, steps: int) -> dict[str, float]:
    lo, hi = settings.low, settings.high
    if settings.param == "ramp":
        return {"m": trial.suggest_float("m", lo, hi), "s": trial.suggest_float("s", lo, hi)}
    out = {f"m_{i}": trial.suggest_float(f"m_{i}", lo, hi) for i in range(steps)}
    out.update({f"s_{i}": trial.suggest_float(f"s_{i}", lo, hi) for i in range(steps)})
    return out


def _sampler(settings: CalibrationSettings, steps: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if settings.sampler == "grid":
            axis = [float(v) for v in np.linspace(settings.low, settings.high, settings.grid_points)]
            return optuna.samplers.GridSampler({"m": axis, "s": axis}, seed=settings.seed)
        if settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=settings.seed)
        # A handful of random points first, then TPE over the joint space (the factors interact).
        startup = min(10, max(4, settings.trials // 4))
        return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, n_startup_trials=startup)


def _row(number: int, source: str, params: Mapping[str, float], parts: Mapping[str, Any], best: float) -> dict:
    return {"trial": number, "source": source, **{k: float(v) for k, v in params.items()},
            **{k: v for k, v in parts.items() if k != "fail_reason"}, "best_so_far": best,
            "fail_reason": parts.get("fail_reason")}


def _plain(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def schedule_with_coefficients(result: CalibrationResult, session, schedule=None):
    """The schedule.json that carries the learned coefficients.

    Args:
        result (`CalibrationResult`): from `calibrate`.
        session (`Session`): the session it ran in (model, bank, menu).
        schedule (`Schedule`, *optional*): the calibrated schedule (`--schedule`); its fields are kept and its
            `coefficients` section set. Without one (`--precision`), a uniform schedule is built: budget 1 (no
            search), its bops and memory cost, and as `quality` the calibration objective on the calibration samples.

    Returns:
        `Schedule`: validated; write it with `save_schedule`.
    """
    from qsched_search.provenance import command_line, device_name, now, versions
    from qsched_search.schedule import Quality, Schedule, cost_of

    section = result.coefficients.to_dict()
    if schedule is not None:
        obj = schedule.to_dict()
        if "coefficients" in obj:
            logger.warning("the schedule already had coefficients (%s); they are replaced",
                           Coefficients.from_dict(obj["coefficients"]).describe())
        obj["coefficients"] = section
        return Schedule.from_dict(obj, source="calibrated schedule")
    per_level = session.bank.level_costs()
    cost = {m: cost_of(result.levels, {lv: c[m] for lv, c in per_level.items()}) for m in ("bops", "memory")}
    calib = result.coefficients.calibration
    described = session.describe()
    return Schedule(
        levels=result.levels, steps=len(result.levels), timesteps=tuple(result.timesteps),
        reference=session.bank.reference, model_id=session.model.model_id,
        weights_sha256=session.model.weights_sha256(), budget=1.0, cost_model="bops",
        cost={**cost, "latency": None},
        quality=Quality(metric=f"calibration:{result.objective['name']}", value=float(result.best["value"]),
                        ci_low=None, ci_high=None, n=int(calib["samples"]), higher_is_better=True),
        provenance={"tool_version": __version__, "seed": int(result.settings.seed),
                    "prompts_sha256": calib["calibration_sha256"], "command": command_line(), "created": now(),
                    "versions": versions(), "device": device_name(str(session.settings.device))},
        extras={"menu": session.menu.to_dict(), "exclude": described["exclude"], "coefficients": section,
                "search": {"method": "none: every step at one level (qsched calibrate --precision)"}},
    )


def evaluations_to_reach(trials: pd.DataFrame, target: float) -> int | None:
    """How many evaluations (the identity baseline counted) a study took until its best reached `target`; None if never."""
    hit = trials.index[trials.best_so_far >= target - 1e-12]
    return None if len(hit) == 0 else int(trials.loc[hit[0], "trial"]) + 1

