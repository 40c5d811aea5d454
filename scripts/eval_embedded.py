"""Evaluates the embedded Fashion-MNIST LCM at 1, 2, 4 and 8 steps and its teacher at 50: alignment, judge FD, FID.

Writes `results/embedded/metrics.csv` (with a provenance header) and `metrics.md`. Samples and their Inception
features are cached (by content hash) in `--cache`, so a rerun only recomputes what changed:

    nice -n 10 python scripts/eval_embedded.py                 # everything, CPU: FID takes most of an hour
    python scripts/eval_embedded.py --no-fid                   # alignment and judge FD only, a few minutes

Sampling reuses `scripts/train_embedded.py`'s `sample_images` (prompts cycle through the 10 classes; batch b of 500
uses seed `--seed + 500 b`; outputs centre-cropped to the 28x28 Fashion-MNIST frame and saved as uint8), so these
numbers are comparable with the training run's own evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_embedded import DDIM_STEPS, GUIDANCE, SCHEDULER_KW, sample_images  # noqa: E402

from qsched_search.embedded.vocab import CLASS_NAMES  # noqa: E402
from qsched_search.eval import distribution_metrics as DM  # noqa: E402
from qsched_search.eval import metrics as M  # noqa: E402
from qsched_search.eval.weights import sha256_file  # noqa: E402
from qsched_search.resources import EMBEDDED_JUDGE_DIR, EMBEDDED_MODEL_DIR  # noqa: E402
from qsched_search.results.io import atomic_path, write_text  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, now, versions  # noqa: E402

TEACHER_UNET = REPO / "results" / "embedded" / "teacher_unet"
logger = logging.getLogger("eval_embedded")


def load_pipelines(device: str):
    """The embedded LCM pipeline and the same pipeline with the teacher UNet and a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    student = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR).to(device)
    teacher = StableDiffusionPipeline.from_pretrained(
        EMBEDDED_MODEL_DIR,
        unet=UNet2DConditionModel.from_pretrained(TEACHER_UNET),
        scheduler=DDIMScheduler(**SCHEDULER_KW, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    ).to(device)
    for pipe in (student, teacher):
        pipe.set_progress_bar_config(disable=True)
    return student, teacher


def cached_samples(cache: Path, key: str, make) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"samples_{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["images"], data["labels"]
    images, labels = make()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
    return images, labels


def cached_inception(cache: Path, fid: DM.FidMetric, images_u8: np.ndarray, what: str,
                     chunk: int = 250) -> np.ndarray:
    """Inception features of uint8 (N, 28, 28) images, cached by the images', the network's and the recipe's hashes.

    Chunks are cached too, so a killed run resumes, and each one is logged (the run's only progress report when
    its output goes to a file).
    """
    digest = hashlib.sha256()
    for part in (sha256_file(fid.inception_path).encode(), DM.FID_PREPROCESSING.encode()):
        digest.update(part)
    recipe = digest.hexdigest()[:12]
    parts = []
    for start in range(0, len(images_u8), chunk):
        block = images_u8[start : start + chunk]
        path = cache / f"inception_{recipe}_{hashlib.sha256(block.tobytes()).hexdigest()[:20]}.npy"
        if not path.is_file():
            t0 = time.time()
            feats = fid.features_uint8(np.repeat(block[..., None], 3, axis=-1), progress=False)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, feats.astype(np.float32))
            logger.info("%s: Inception features %d/%d (%.0f ms/image)", what, start + len(block), len(images_u8),
                        1000 * (time.time() - t0) / len(block))
        parts.append(np.load(path))
    return np.concatenate(parts).astype(np.float64)


def fmt(value: float, low: float, high: float, digits: int) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="samples per configuration")
    parser.add_argument("--seed", type=int, default=1000, help="base seed (the training run's eval used 1000)")
    parser.add_argument("--steps", default="1,2,4,8", help="student step counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (slow on CPU)")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "eval_embedded",
                        help="samples and Inception features by content hash")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "embedded")
    parser.add_argument("--weights-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    judge_test_acc = float(json.loads((EMBEDDED_JUDGE_DIR / "config.json").read_text())["test_accuracy"])
    names = ["judge_acc", "judge_fd"] + ([] if args.no_fid else ["fid"])
    metric = dict(zip(names, M.build_metrics(names, device=args.device, weights_dir=args.weights_dir)))
    student, teacher = load_pipelines(args.device)
    student_sha = sha256_file(EMBEDDED_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")[:12]
    teacher_sha = sha256_file(TEACHER_UNET / "diffusion_pytorch_model.safetensors")[:12]

    runs = [("teacher (DDIM, CFG 3.0)", "teacher", teacher, DDIM_STEPS, GUIDANCE, teacher_sha)]
    runs += [("LCM student", "student", student, int(s), 0.0, student_sha) for s in args.steps.split(",")]

    rows = []
    configs = []
    for label, kind, pipe, steps, guidance, sha in runs:
        key = f"{kind}_{steps}steps_g{guidance}_n{args.samples}_seed{args.seed}_{sha}"
        t0 = time.time()
        images, labels = cached_samples(
            args.cache, key, lambda: sample_images(pipe, args.samples, steps, guidance, args.seed, args.device))
        logger.info("%s, %d steps: %d samples (%.0f s)", label, steps, len(images), time.time() - t0)
        configs.append((label, steps, guidance, images, labels))
    # The noise floor: real training images (disjoint from the test set the distances are measured against).
    train_images, train_labels = DM.load_fashion_mnist("train")
    configs.append(("real Fashion-MNIST (train[:n])", 0, float("nan"), train_images[: args.samples],
                    train_labels[: args.samples]))

    # Every Inception feature first (the slow part, cached per configuration), then the scores: the reference
    # statistics are only needed at the end.
    inception = {}
    if "fid" in names:
        for label, steps, _, images, _ in configs:
            inception[(label, steps)] = cached_inception(args.cache, metric["fid"], images, f"{label}, {steps} steps")

    for label, steps, guidance, images, labels in configs:
        x = torch.from_numpy(images).float().div(255).unsqueeze(1)
        prompts = [CLASS_NAMES[i] for i in labels]
        row = {"model": label, "steps": steps, "guidance": guidance, "samples": len(images),
               "seed": args.seed if steps else float("nan")}
        for name in names:
            t0 = time.time()
            if name == "fid":
                est = metric["fid"].score_features(inception[(label, steps)])
            else:
                est = metric[name].score(x, None, prompts)
            row |= {name: est.value, f"{name}_ci_low": est.ci_low, f"{name}_ci_high": est.ci_high}
            logger.info("%s, %d steps: %s %.4f [%.4f, %.4f] (%.0f s)", label, steps, name, est.value, est.ci_low,
                        est.ci_high, time.time() - t0)
        row["judge_test_accuracy"] = judge_test_acc
        row["alignment_over_judge_accuracy"] = row["judge_acc"] / judge_test_acc
        rows.append(row)
    frame = pd.DataFrame(rows)

    device = device_name(args.device)
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    header = [
        "embedded model evaluation (scripts/eval_embedded.py)",
        f"command: {command_line()}",
        f"device: {device}, niceness {os.nice(0)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"a 2-core machine shared with other jobs; date: {now()}",
        f"versions: {vers}",
        f"samples per row: {args.samples}, prompts cycle through the 10 classes, seeds {args.seed} + 500 b per batch b",
        f"judge: {EMBEDDED_JUDGE_DIR.name}, test accuracy {judge_test_acc:.4f}; judge_fd and fid vs the 10,000 "
        "Fashion-MNIST test images",
        "confidence intervals 95%: judge_acc Student-t of the mean; judge_fd and fid seeded bootstrap (normal)",
    ]
    with atomic_path(args.out / "metrics.csv") as tmp:
        with open(tmp, "w") as f:
            f.writelines(f"# {line}\n" for line in header)
            frame.to_csv(f, index=False, float_format="%.6g")

    four = frame[(frame["model"] == "LCM student") & (frame["steps"] == 4)]
    lines = ["# Embedded model: quality by step count", ""]
    lines += [f"- {line}" for line in header[1:]]
    lines += [f"- metric preprocessing: judge: {DM.JUDGE_PREPROCESSING}"]
    if "fid" in names:
        lines += [f"- FID: {DM.FID_PREPROCESSING}; {metric['fid'].bootstrap_rounds} bootstrap rounds"]
    columns = ["model", "steps", "alignment accuracy (judge_acc)", "judge FD"] + (["FID"] if "fid" in names else [])
    columns.append("alignment / judge test acc.")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["model"], str(r["steps"]) if r["steps"] else "-",
                 fmt(r["judge_acc"], r["judge_acc_ci_low"], r["judge_acc_ci_high"], 3),
                 fmt(r["judge_fd"], r["judge_fd_ci_low"], r["judge_fd_ci_high"], 2)]
        if "fid" in names:
            cells.append(fmt(r["fid"], r["fid_ci_low"], r["fid_ci_high"], 2))
        cells.append(f"{r['alignment_over_judge_accuracy']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Judge test accuracy: {judge_test_acc:.4f} (from `{EMBEDDED_JUDGE_DIR.name}/config.json`)."]
    if len(four):
        lines.append(f"4-step alignment accuracy / judge test accuracy: "
                     f"{float(four['alignment_over_judge_accuracy'].iloc[0]):.3f}.")
    lines += ["", "The real-image row is the noise floor at this sample count: distances are biased upward at small n, "
              "so compare FD and FID only between rows of equal `samples`.", ""]
    write_text(args.out / "metrics.md", "\n".join(lines))
    for name in ("metrics.csv", "metrics.md"):
        (args.out / name).chmod(0o644)  # atomic writes start as 0600
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
