"""Draws `results/embedded/samples_grid.png`: the embedded model's samples, one column per class, rows by step count.

Each seed is one row per step count; a cell's generator is seeded with `seed * 100 + class index`, so every step
count starts from the same initial noise and rows differ only in the number of steps:

    python scripts/sample_grid.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qsched_search.embedded.vocab import CLASS_NAMES  # noqa: E402
from qsched_search.resources import EMBEDDED_MODEL_DIR  # noqa: E402
from qsched_search.results.io import save_figure  # noqa: E402


@torch.no_grad()
def sample_row(pipe, steps: int, seed: int, device: str) -> torch.Tensor:
    """One sample per class, (10, 32, 32) in [0, 1]; one generator per prompt."""
    generators = [torch.Generator(device=device).manual_seed(seed * 100 + c) for c in range(len(CLASS_NAMES))]
    images = pipe(list(CLASS_NAMES), num_inference_steps=steps, guidance_scale=0.0, generator=generators,
                  output_type="pt", height=32, width=32).images
    return images[:, 0].float().clamp(0, 1).cpu()


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,2,4,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "embedded" / "samples_grid.png")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    rows = [(n, seed, sample_row(pipe, n, seed, args.device)) for n in steps for seed in seeds]

    cols = len(CLASS_NAMES)
    cell = 0.78  # inches: 32 px at ~41 px per inch, large enough to read at README width
    width, height = cols * cell + 1.0, len(rows) * cell + 0.7
    fig, axes = plt.subplots(len(rows), cols, figsize=(width, height), squeeze=False,
                             gridspec_kw={"wspace": 0.04, "hspace": 0.04, "left": 1.0 / width, "right": 0.995,
                                          "top": 1 - 0.55 / height, "bottom": 0.01})
    for r, (n, seed, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                ax.set_title(CLASS_NAMES[c], fontsize=10)
            if c == 0:
                label = f"{n} step{'s' if n > 1 else ''}" if seed == seeds[0] else ""
                ax.set_ylabel(f"{label}\nseed {seed}" if label else f"seed {seed}", fontsize=9, rotation=0,
                              ha="right", va="center", labelpad=6)
    # Thin separators between step groups: each group shares its seeds' initial noise.
    for g in range(1, len(steps)):
        first, last = axes[g * len(seeds), 0].get_position(), axes[g * len(seeds), -1].get_position()
        y = first.y1 + 0.2 * (axes[g * len(seeds) - 1, 0].get_position().y0 - first.y1)
        fig.add_artist(plt.Line2D([0.01, last.x1], [y, y], color="0.55", linewidth=0.8))
    fig.suptitle("Embedded Fashion-MNIST LCM (fmnist-lcm): samples by step count, guidance 0", fontsize=11,
                 y=1 - 0.12 / height)
    save_figure(args.out, fig, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
