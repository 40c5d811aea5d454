"""Writes the judge's real statistics (`real_stats.npz`): its features' mean and covariance on Fashion-MNIST test.

The `judge_fd` metric reads this file; it ships with the judge because it is small (128-d) and depends only on the
judge's weights and the test set. Run it again whenever the judge changes (the metric checks the judge's sha256):

    python scripts/judge_real_stats.py
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qsched_search.eval.distribution_metrics import FASHION_MNIST_DIR, JudgeFrechetDistance, load_fashion_mnist  # noqa: E402
from qsched_search.eval.weights import sha256_file  # noqa: E402
from qsched_search.resources import EMBEDDED_JUDGE_DIR  # noqa: E402
from qsched_search.results.io import atomic_path  # noqa: E402
from qsched_search.results.provenance import now, versions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST idx files")
    parser.add_argument("--out", type=Path, default=EMBEDDED_JUDGE_DIR / "real_stats.npz")
    args = parser.parse_args()

    images, _ = load_fashion_mnist("test", args.data)
    # The metric's own feature path, so the real and the generated features are computed the same way; building
    # the metric with stats missing is fine because they are only read when scoring.
    metric = JudgeFrechetDistance(device="cpu")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    feats = metric.features(x)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    with atomic_path(args.out) as tmp:
        tmp.chmod(0o644)  # mkstemp makes 0600; the file ships with the package
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, mu=mu, sigma=sigma, n=len(feats),
                judge_sha256=sha256_file(EMBEDDED_JUDGE_DIR / "model.safetensors"),
                images_sha256=hashlib.sha256(images.tobytes()).hexdigest(),
                source=f"{args.data}/t10k-images-idx3-ubyte.gz (Debian dataset-fashion-mnist)",
                created=now(), versions=str(versions()),
            )
    print(f"wrote {args.out}: {len(feats)} images, {feats.shape[1]}-d features, trace(sigma) {np.trace(sigma):.3f}")


if __name__ == "__main__":
    main()
