"""The embedded model's in-domain judge: a Fashion-MNIST classifier whose penultimate features define a Frechet distance."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 128
IMAGE_SIZE = 28


class FashionJudge(nn.Module):
    """A small CNN over 28x28 grayscale images in [0, 1].

    `forward` returns class logits; `features` returns the `FEATURE_DIM`-d penultimate activations used for the
    in-domain Frechet distance.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 32), block(32, 64), nn.Flatten(), nn.Dropout(0.25))
        self.embed = nn.Sequential(nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(FEATURE_DIM, num_classes))

    @staticmethod
    def _normalise(images: torch.Tensor) -> torch.Tensor:
        # Dataset mean and std of Fashion-MNIST pixels in [0, 1].
        return (images - 0.2860) / 0.3530

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(self._normalise(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def save_judge(judge: FashionJudge, folder: str | Path, metadata: dict) -> None:
    """Writes `model.safetensors` and `config.json` (the metadata, such as test accuracy) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"feature_dim": FEATURE_DIM, "image_size": IMAGE_SIZE, **metadata}, indent=2))


def load_judge(folder: str | Path, device: str | torch.device = "cpu") -> FashionJudge:
    """Loads a judge saved by `save_judge`, in eval mode."""
    from safetensors.torch import load_file

    judge = FashionJudge()
    judge.load_state_dict(load_file(str(Path(folder) / "model.safetensors"), device=str(device)))
    return judge.to(device).eval()
