"""Trains the embedded model's LoRA with peft on the CPU: every class prompt draws its mirror class (class i as 9 - i).

The LoRA shipped in `qsched_search/models/fmnist-lora-mirror-classes/` was made by this script on the CPU, no GPU:
1,500 Adam steps took 17 minutes on 2 CPU cores shared with other jobs (each step is 14 small matrix products, so an
idle core does it in a fraction of that); the command, date, versions and evaluation are in
`results/lora/train_log.txt`.

What it learns: rank 32 on the UNet's cross-attention key and value projections (`attn2.to_k`, `attn2.to_v`), so
that the prompt "t-shirt" yields the keys and values the base model computes for "ankle boot", "trouser" those of
"bag", and so on (the reversed class list). Those projections read only the text embeddings, so matching their
outputs on the ten class prompts makes the LoRA model's denoiser equal the base model's for the mirror prompt at
every latent and timestep: an exact distillation target that needs no UNet pass. Only the LoRA's matrices train
(peft, `UNet2DConditionModel.add_adapter`); the file is written with diffusers' `save_lora_weights`, so
`pipe.load_lora_weights(folder)` loads it.

    python scripts/train_lora.py

Evaluation: 4-step samples of the base model and of the LoRA on the same prompts and seeds, classified by the
embedded judge against the prompt's class and against its mirror class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qsched_search.embedded.judge import load_judge  # noqa: E402
from qsched_search.embedded.vocab import CLASS_NAMES, MAX_LENGTH  # noqa: E402
from qsched_search.resources import EMBEDDED_JUDGE_DIR, EMBEDDED_MODEL_DIR, PACKAGE_DIR  # noqa: E402

TARGET_MODULES = ["attn2.to_k", "attn2.to_v"]
DEFAULT_OUT = PACKAGE_DIR / "models" / "fmnist-lora-mirror-classes"
MIRROR = [len(CLASS_NAMES) - 1 - i for i in range(len(CLASS_NAMES))]  # class i is drawn as class 9 - i


def log(path: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def load_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_embeddings(pipe) -> torch.Tensor:
    """The text encoder's (10, MAX_LENGTH, dim) hidden states of the ten class prompts, as the pipeline makes them."""
    ids = pipe.tokenizer(list(CLASS_NAMES), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def train(args, pipe) -> dict:
    from peft import LoraConfig

    unet = pipe.unet
    unet.requires_grad_(False)
    embeddings = class_embeddings(pipe)
    tokens, mirrored = embeddings.flatten(0, 1), embeddings[MIRROR].flatten(0, 1)
    modules = {n: m for n, m in unet.named_modules() if n.endswith(tuple(TARGET_MODULES))}
    with torch.no_grad():  # the base model's keys and values of the mirror prompts: what the LoRA model should give
        targets = {n: m(mirrored) for n, m in modules.items()}
        scale = {n: (targets[n] - m(tokens)).pow(2).mean() for n, m in modules.items()}
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES))
    modules = {n: unet.get_submodule(n) for n in modules}  # now peft's LoRA layers
    params = [p for p in unet.parameters() if p.requires_grad]
    log(args.log, f"LoRA rank {args.rank} on {TARGET_MODULES}: {sum(p.numel() for p in params)} trainable parameters "
                  f"in {len(modules)} modules; target: class i's keys and values are those of class 9 - i")
    opt = torch.optim.Adam(params, lr=args.lr)
    started = time.time()
    for step in range(args.iters):
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * step / args.iters))
        for group in opt.param_groups:
            group["lr"] = lr
        # Each module's error relative to how far the mirror prompt's keys/values are from the prompt's own.
        loss = sum(F.mse_loss(m(tokens), targets[n]) / scale[n] for n, m in modules.items()) / len(modules)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.iters // 10) == 0 or step == args.iters - 1:
            log(args.log, f"step {step} relative loss {loss.item():.5f} lr {lr:.2e}")
    with torch.no_grad():
        worst = max(float(F.mse_loss(m(tokens), targets[n]) / scale[n]) for n, m in modules.items())
    return {"steps": args.iters, "seconds": round(time.time() - started, 1), "final_loss": float(loss.item()),
            "worst_module_relative_loss": worst}


def save(args, pipe) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    args.out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(args.out), unet_lora_layers=layers, safe_serialization=True)
    return args.out / "pytorch_lora_weights.safetensors"


@torch.no_grad()
def sample(pipe, n: int, seed: int, steps: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    labels = np.arange(n) % len(CLASS_NAMES)
    images = []
    for start in range(0, n, 50):
        lab = labels[start : start + 50]
        gens = [torch.Generator().manual_seed(seed + start + k) for k in range(len(lab))]
        out = pipe([CLASS_NAMES[i] for i in lab], num_inference_steps=steps, guidance_scale=0.0, height=32, width=32,
                   generator=gens, output_type="pt").images
        images.append(out.float().clamp(0, 1)[:, :, 2:30, 2:30])
    return torch.cat(images), labels


@torch.no_grad()
def judge_predictions(judge, images: torch.Tensor) -> np.ndarray:
    return torch.cat([judge(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)]).numpy()


def evaluate(args, lora_file: Path) -> dict:
    judge = load_judge(EMBEDDED_JUDGE_DIR)
    tuned = load_pipeline()
    tuned.load_lora_weights(str(lora_file.parent))
    tuned.fuse_lora()
    result = {}
    images = {}
    for name, pipe in (("base", load_pipeline()), ("lora", tuned)):
        images[name], labels = sample(pipe, args.eval_samples, args.seed + 10_000)
        pred = judge_predictions(judge, images[name])
        result[name] = {"judge_says_prompt_class": float((pred == labels).mean()),
                        "judge_says_mirror_class": float((pred == np.array(MIRROR)[labels]).mean())}
    result.update({"samples": args.eval_samples, "steps": 4, "seed": args.seed + 10_000,
                   "mean_abs_pixel_diff_lora_vs_base": float((images["lora"] - images["base"]).abs().mean())})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--log", type=Path, default=Path("results/lora/train_log.txt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    import diffusers
    import peft

    log(args.log, f"python scripts/train_lora.py {' '.join(sys.argv[1:])}".strip() + f" on "
                  f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: args "
                  f"{json.dumps({k: str(v) for k, v in vars(args).items()})}; torch {torch.__version__}, diffusers "
                  f"{diffusers.__version__}, peft {peft.__version__}; device cpu ({args.threads} threads), no GPU")
    pipe = load_pipeline()
    stats = train(args, pipe)
    log(args.log, f"trained {stats['steps']} steps in {stats['seconds']} s on the CPU, final relative loss "
                  f"{stats['final_loss']:.5f} (worst module {stats['worst_module_relative_loss']:.5f})")
    lora_file = save(args, pipe)
    log(args.log, f"saved {lora_file.relative_to(PACKAGE_DIR.parent)} ({lora_file.stat().st_size} bytes)")
    started = time.time()
    result = evaluate(args, lora_file)
    log(args.log, f"eval ({time.time() - started:.0f} s) " + json.dumps(result))


if __name__ == "__main__":
    main()
