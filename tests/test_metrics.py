"""Metrics: the registry, LPIPS with the real backbone, PSNR/SSIM, the judge's accuracy and FD, FID's pieces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qsched_search.embedded.vocab import CLASS_NAMES
from qsched_search.errors import QschedError
from qsched_search.eval import distribution_metrics as DM
from qsched_search.eval import image_metrics as IM
from qsched_search.eval import metrics as M
from qsched_search.resources import EMBEDDED_JUDGE_DIR
from qsched_search.results.metric_facts import METRICS
from tests.helpers import default_weights_or_skip

SHARED = Path(__file__).resolve().parents[2] / "shared"
ALL_METRICS = ["fid", "judge_acc", "judge_fd", "lpips", "psnr", "ssim"]


def load_png(name: str) -> torch.Tensor:
    from PIL import Image

    array = np.asarray(Image.open(SHARED / "lpips-examples" / name).convert("RGB")).copy()
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def fmnist_test() -> tuple[torch.Tensor, list[str]]:
    try:
        images, labels = DM.load_fashion_mnist("test")
    except QschedError as exc:  # the Debian package is missing: say which, rather than error
        pytest.skip(str(exc))
    return torch.from_numpy(images).float().div(255).unsqueeze(1), [CLASS_NAMES[i] for i in labels]


# ----------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_metric():
    assert M.available_metrics() == ALL_METRICS


@pytest.mark.parametrize("name", ALL_METRICS)
def test_every_metric_declares_its_contract(name):
    cls = M.get_metric_class(name)
    assert cls.name == name
    assert isinstance(cls.higher_is_better, bool) and isinstance(cls.paired, bool)
    assert cls.preprocessing
    # Direction and pairing come from the results contract, which the report reads without loading a network.
    assert (cls.higher_is_better, cls.paired) == (METRICS[name].higher_is_better, METRICS[name].paired)


def test_register_metric_records_the_facts_of_a_new_metric():
    from qsched_search.results.metric_facts import facts

    @M.register_metric("test_sharpness", higher_is_better=True, paired=False, per_image=True)
    class Sharpness(M.Metric):
        preprocessing = "none"

        def score(self, images, reference, prompts):
            return M.mean_estimate(images.flatten(1).std(1))

    try:
        assert M.get_metric_class("test_sharpness") is Sharpness and Sharpness.higher_is_better
        assert facts("test_sharpness").per_image and not facts("test_sharpness").paired
        with pytest.raises(QschedError, match="already known"):
            M.register_metric("test_sharpness", higher_is_better=False, paired=False, per_image=True)
    finally:
        M._REGISTRY.pop("test_sharpness", None)
        METRICS.pop("test_sharpness", None)


def test_registry_miss_names_the_key_and_lists_valid_ones():
    with pytest.raises(QschedError) as info:
        M.build_metrics(["lpips_vgg"])
    message = str(info.value)
    assert "'lpips_vgg'" in message and ", ".join(ALL_METRICS) in message


def test_build_metrics_rejects_a_bare_string_and_duplicates():
    with pytest.raises(QschedError, match="one string"):
        M.build_metrics("psnr")
    with pytest.raises(QschedError, match="more than once"):
        M.build_metrics(["psnr", "psnr"])


def test_register_metric_refuses_a_second_class_under_a_taken_name():
    with pytest.raises(QschedError, match="already registered"):
        @M.register_metric("psnr")
        class Other(IM.PsnrMetric):
            pass


# ----------------------------------------------------------------------------------------------- intervals


def test_mean_estimate_is_a_student_t_interval():
    from scipy import stats

    values = np.array([0.1, 0.4, 0.35, 0.8, 0.55])
    est = M.mean_estimate(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert est.n == 5 and est.value == pytest.approx(values.mean())
    assert (est.ci_low, est.ci_high) == pytest.approx((low, high))


def test_mean_estimate_keeps_the_per_image_values():
    values = np.array([0.1, 0.4, 0.35])
    est = M.mean_estimate(values)
    assert est.per_image == (0.1, 0.4, 0.35)
    # Two estimates of the same values compare equal whatever their per-image values.
    assert est == M.Estimate(est.value, est.ci_low, est.ci_high, 3)


def test_mean_estimate_edge_cases():
    one = M.mean_estimate(np.array([0.3]))
    assert one.value == 0.3 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    same = M.mean_estimate(np.array([math.inf, math.inf]))
    assert same.value == math.inf and same.ci_low == math.inf
    mixed = M.mean_estimate(np.array([math.inf, 30.0]))
    assert mixed.value == math.inf and math.isnan(mixed.ci_low)


def _sqrtm_frechet(feats, mu_r, sigma_r, sqrtm) -> float:
    """clean-fid's formula: |mu - mu_r|^2 + tr(S) + tr(S_r) - 2 tr(sqrtm(S S_r))."""
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    covmean = np.real(sqrtm(sigma @ sigma_r))
    return float((mu - mu_r) @ (mu - mu_r) + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(covmean))


def test_frechet_eigen_form_matches_clean_fid():
    from scipy import linalg

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    real = rng.standard_normal((1000, 16)) * 1.3 + 0.2
    mu_r, sigma_r = real.mean(0), np.cov(real, rowvar=False)
    value = DM.frechet_from_features(feats, mu_r, sigma_r)
    assert value == pytest.approx(_sqrtm_frechet(feats, mu_r, sigma_r, linalg.sqrtm), rel=1e-6)
    fast = DM.frechet_eig(feats, mu_r, DM.sqrt_psd(sigma_r), float(np.trace(sigma_r)))
    assert fast == pytest.approx(value, rel=1e-6)
    root = DM.sqrt_psd(sigma_r)
    np.testing.assert_allclose(root @ root, sigma_r, atol=1e-10)
    low, high = DM.bootstrap_frechet(feats, mu_r, sigma_r, value, rounds=50, seed=0)
    assert low < value < high
    assert (low, high) == DM.bootstrap_frechet(feats, mu_r, sigma_r, value, rounds=50, seed=0)  # seeded


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead judge features: the reference sqrtm's own notice
def test_frechet_metrics_work_when_sqrtm_takes_no_disp_argument(monkeypatch):
    """SciPy 1.18 drops `sqrtm(A, disp=...)`; clean-fid's own frechet_distance passes disp=False. The metrics here
    must not depend on either: with a `sqrtm(A)` that only takes the matrix (and counts its calls), judge_fd and
    frechet_from_features give the eigenvalue form's values."""
    from scipy import linalg

    original = linalg.sqrtm
    calls = []

    def sqrtm(A):  # the new signature: no disp, no blocksize
        calls.append(A.shape)
        return original(A)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    real = rng.standard_normal((800, 12)) + 0.3
    mu_r, sigma_r = real.mean(0), np.cov(real, rowvar=False)
    value = DM.frechet_from_features(feats, mu_r, sigma_r)
    assert value == DM.frechet_eig(feats, mu_r, DM.sqrt_psd(sigma_r), float(np.trace(sigma_r)))
    assert calls == []  # the package never called sqrtm
    assert value == pytest.approx(_sqrtm_frechet(feats, mu_r, sigma_r, linalg.sqrtm), rel=1e-6)
    calls.clear()
    # The judge's Frechet distance through the metric (against its shipped real statistics), and its interval.
    images = torch.nn.functional.avg_pool2d(torch.rand(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)), 3, 1, 1)
    metric, = M.build_metrics(["judge_fd"])
    metric.bootstrap_rounds = 20
    est = metric.score(images[:300], None, [])
    judge_feats = metric.features(images[:300])
    mu_j, sigma_j = metric.reference_stats()
    assert est.value == pytest.approx(DM.frechet_eig(judge_feats, mu_j, DM.sqrt_psd(sigma_j), float(np.trace(sigma_j))),
                                      rel=1e-9)
    assert est.value == pytest.approx(_sqrtm_frechet(judge_feats, mu_j, sigma_j, linalg.sqrtm), rel=1e-5)
    assert est.ci_low <= est.value <= est.ci_high and est.n == 300
    assert len(calls) == 1  # only the test's own reference computation


# ----------------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("bad, match", [
    (torch.full((2, 1, 32, 32), math.nan), "NaN"),
    (torch.full((2, 1, 32, 32), 1.5), r"\[0, 1\]"),
    (torch.zeros(2, 2, 32, 32), "C = 1 or 3"),
    (torch.zeros(1, 32, 32), "C = 1 or 3"),
])
def test_bad_images_are_refused_with_one_line(bad, match):
    metric = IM.PsnrMetric()
    with pytest.raises(QschedError, match=match) as info:
        metric.score(bad, torch.zeros_like(bad), [])
    assert "\n" not in str(info.value)


def test_paired_metric_needs_a_matching_reference():
    metric = IM.SsimMetric()
    images = torch.rand(2, 1, 32, 32)
    with pytest.raises(QschedError, match="reference=None"):
        metric.score(images, None, [])
    with pytest.raises(QschedError, match="differs"):
        metric.score(images, torch.rand(3, 1, 32, 32), [])


# ----------------------------------------------------------------------------------------------- LPIPS


def test_lpips_matches_published_values_with_the_real_backbone():
    default_weights_or_skip()
    metric, = M.build_metrics(["lpips"])
    ref, p0, p1 = load_png("ex_ref.png"), load_png("ex_p0.png"), load_png("ex_p1.png")
    assert metric.score(p0, ref, ["x"]).value == pytest.approx(0.722, abs=0.01)
    assert metric.score(p1, ref, ["x"]).value == pytest.approx(0.138, abs=0.01)


def test_lpips_with_a_random_backbone_gives_clearly_different_values():
    torch.manual_seed(0)
    model = IM._lpips_model(None, torch.device("cpu"))
    ref, p0, p1 = load_png("ex_ref.png"), load_png("ex_p0.png"), load_png("ex_p1.png")
    with torch.no_grad():
        d0 = model(p0, ref, normalize=True).item()
        d1 = model(p1, ref, normalize=True).item()
    # The real backbone gives 0.722 and 0.138; a random one gives small, nearly equal values.
    assert d0 < 0.3 and abs(d0 - d1) < 0.2


def test_lpips_grayscale_small_images():
    default_weights_or_skip()
    metric, = M.build_metrics(["lpips"])
    images = torch.rand(3, 1, 32, 32)
    assert metric.score(images, images.clone(), ["a"] * 3).value == pytest.approx(0.0, abs=1e-6)
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    est = metric.score(noisy, images, ["a"] * 3)
    assert est.value > 0.01 and est.n == 3 and est.ci_low <= est.value <= est.ci_high
    assert "64x64" in IM.LPIPS_PREPROCESSING and "3 channels" in IM.LPIPS_PREPROCESSING


def test_lpips_missing_backbone_is_one_line(tmp_path):
    with pytest.raises(QschedError) as info:
        M.build_metrics(["lpips"], weights_dir=tmp_path)
    assert "\n" not in str(info.value) and "alexnet.pth" in str(info.value)


# ----------------------------------------------------------------------------------------------- PSNR, SSIM


def test_psnr_and_ssim_of_identical_images():
    images = torch.rand(4, 3, 32, 32)
    psnr, ssim = M.build_metrics(["psnr", "ssim"])
    assert psnr.score(images, images.clone(), []).value == math.inf
    assert ssim.score(images, images.clone(), []).value == pytest.approx(1.0)


def test_psnr_of_known_noise():
    g = torch.Generator().manual_seed(0)
    reference = torch.full((16, 1, 32, 32), 0.5)
    noisy = reference + 0.05 * torch.randn(reference.shape, generator=g)  # MSE 0.0025 -> 26.02 dB
    est = IM.PsnrMetric().score(noisy, reference, [])
    assert est.value == pytest.approx(10 * math.log10(1 / 0.0025), abs=0.3)
    assert est.ci_low < est.value < est.ci_high and est.n == 16


def test_ssim_falls_as_noise_grows():
    g = torch.Generator().manual_seed(0)
    reference = torch.nn.functional.avg_pool2d(torch.rand(8, 1, 36, 36, generator=g), 5, stride=1)  # smooth texture
    ssim = IM.SsimMetric()
    small = ssim.score((reference + 0.02 * torch.randn(reference.shape, generator=g)).clamp(0, 1), reference, [])
    large = ssim.score((reference + 0.2 * torch.randn(reference.shape, generator=g)).clamp(0, 1), reference, [])
    assert 0.8 < small.value < 1.0 and large.value < 0.5 * small.value


# ----------------------------------------------------------------------------------------------- judge


def test_judge_accuracy_on_real_test_images(fmnist_test):
    images, prompts = fmnist_test
    metric, = M.build_metrics(["judge_acc"])
    est = metric.score(images[:2000], None, prompts[:2000])
    assert est.value > 0.9 and est.n == 2000
    assert 0.0 <= est.ci_low < est.value < est.ci_high <= 1.0
    # Each image's hit or miss, so that two schedules' accuracies compare sample by sample.
    assert est.per_image is not None and len(est.per_image) == 2000 and set(est.per_image) <= {0.0, 1.0}
    assert sum(est.per_image) / 2000 == pytest.approx(est.value)


def test_judge_accuracy_crops_the_models_32px_frame(fmnist_test):
    images, prompts = fmnist_test
    padded = torch.nn.functional.pad(images[:200], (2, 2, 2, 2))  # the embedded model's black border
    metric = DM.JudgeAccuracy()
    assert metric.score(padded, None, prompts[:200]).value == metric.score(images[:200], None, prompts[:200]).value


def test_judge_accuracy_refuses_prompts_that_are_not_classes():
    metric = DM.JudgeAccuracy()
    with pytest.raises(QschedError, match="class names") as info:
        metric.score(torch.rand(2, 1, 32, 32), None, ["dress", "a red dress"])
    assert "ankle boot" in str(info.value)
    with pytest.raises(QschedError, match="1-channel"):
        metric.score(torch.rand(2, 3, 32, 32), None, ["dress", "bag"])
    with pytest.raises(QschedError, match="28x28"):
        metric.score(torch.rand(2, 1, 64, 64), None, ["dress", "bag"])


def test_judge_fd_of_real_images_is_small_and_of_noise_large(fmnist_test):
    images, _ = fmnist_test
    metric, = M.build_metrics(["judge_fd"])
    real = metric.score(images[:1000], None, [])  # a real subset against the shipped statistics of all 10,000
    assert real.value < 5 and real.n == 1000 and real.ci_low <= real.value <= real.ci_high
    noise = metric.score(torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)), None, [])
    assert noise.value > 100 and noise.ci_low > 50


@pytest.mark.slow
def test_judge_fd_of_the_test_set_against_itself_is_zero(fmnist_test):
    # All 10,000 images: also checks that real_stats.npz matches the metric's own feature path.
    images, _ = fmnist_test
    metric, = M.build_metrics(["judge_fd"])
    metric.bootstrap_rounds = 10
    same = metric.score(images, None, [])
    assert same.value < 1e-3 and same.n == len(images)


def test_judge_fd_refuses_stale_real_statistics(monkeypatch, tmp_path):
    import shutil

    for name in ("model.safetensors", "real_stats.npz", "config.json"):
        shutil.copy(EMBEDDED_JUDGE_DIR / name, tmp_path / name)
    with open(tmp_path / "model.safetensors", "ab") as f:
        f.write(b"\0")  # a different judge file
    monkeypatch.setattr(DM.JudgeFrechetDistance, "judge_dir", tmp_path)
    metric = DM.JudgeFrechetDistance.__new__(DM.JudgeFrechetDistance)
    metric._stats = None
    with pytest.raises(QschedError, match="judge_real_stats.py"):
        metric.reference_stats()


# ----------------------------------------------------------------------------------------------- FID pieces


def test_fid_preprocessing_crops_quantizes_and_replicates():
    images = torch.zeros(2, 1, 32, 32)
    images[:, :, 2:30, 2:30] = 0.5
    u8 = DM.FidMetric.to_uint8(images)
    assert u8.shape == (2, 28, 28, 3) and u8.dtype == np.uint8
    assert (u8 == 128).all()  # round(0.5 * 255) = 128: the border was cropped away


@pytest.fixture(scope="module")
def fid_metric():
    default_weights_or_skip()
    return M.build_metrics(["fid"])[0]


def test_fid_inception_gives_2048_d_features(fid_metric):
    images, _ = DM.load_fashion_mnist("test")
    feats = fid_metric.features(torch.from_numpy(images[:4]).float().div(255).unsqueeze(1))
    assert feats.shape == (4, 2048) and np.isfinite(feats).all() and feats.std() > 0


@pytest.mark.slow
def test_fid_distance_to_its_own_statistics_is_zero(fid_metric):
    # Statistics made from the same features isolate the 2048-d distance and interval code from the (slow, cached)
    # Fashion-MNIST reference; clean-fid's sqrtm of a 2048-d matrix alone takes about 10 s on 2 cores.
    rng = np.random.default_rng(0)
    fake = rng.standard_normal((64, 2048)) + 1.0
    fid_metric._stats = (fake.mean(0), np.cov(fake, rowvar=False))
    fid_metric.bootstrap_rounds = 3
    try:
        est = fid_metric.score_features(fake)
    finally:
        fid_metric._stats = None
    assert est.value < 1e-3 * np.trace(np.cov(fake, rowvar=False)) and est.n == 64


def test_fid_reference_cache_is_built_from_given_features_and_reused(tmp_path):
    source = default_weights_or_skip()
    (tmp_path / "inception_fid.pt").symlink_to(source / "inception_fid.pt")
    metric, = M.build_metrics(["fid"], weights_dir=tmp_path)
    with pytest.raises(QschedError, match="every Fashion-MNIST test image"):
        metric.reference_stats(real_features=np.zeros((10, 2048)))
    real = np.random.default_rng(0).standard_normal((10000, 2048))
    mu, sigma = metric.reference_stats(real_features=real)
    cache = tmp_path / DM.FID_REFERENCE_FILE
    assert cache.is_file() and oct(cache.stat().st_mode & 0o777) == "0o644"
    again, = M.build_metrics(["fid"], weights_dir=tmp_path)
    mu2, sigma2 = again.reference_stats()  # from the cache: computing would take half an hour
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
