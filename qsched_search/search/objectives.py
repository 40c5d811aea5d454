"""Calibration losses for Q-Sched coefficients, by name: reference-free JAQ (judge or CLIP) and LPIPS to full precision."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from qsched_search.errors import QschedError
from qsched_search.eval.distribution_metrics import sqrt_psd

__all__ = ["LOSSES", "OBJECTIVES", "ClipJaq", "JudgeJaq", "Objective", "ReferenceLpips", "build_objective", "register_objective"]

LOSSES = ("jaq", "reference")
# A log of a CLIPScore of 0 (possible with a poor model) would be -inf; scores are clamped to this first.
_MIN_CLIP_SCORE = 1e-6


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
        from qsched_search.eval.distribution_metrics import JudgeFrechetDistance

        self.k = float(k)
        self.fd = JudgeFrechetDistance(device=device, weights_dir=weights_dir)
        mu, sigma = self.fd.reference_stats()
        self._mu, self._root, self._trace = mu, sqrt_psd(sigma), float(np.trace(sigma))

    def score(self, images, prompts, reference=None) -> dict[str, float]:
        from qsched_search.embedded.vocab import CLASS_NAMES
        from qsched_search.eval.distribution_metrics import frechet_eig

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
        from qsched_search.eval.image_metrics import LpipsMetric

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
