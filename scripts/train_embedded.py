"""Trains the embedded default model on Fashion-MNIST: VAE, judge, teacher, then latent consistency distillation.

The result is a diffusers `StableDiffusionPipeline` (tiny CLIP text encoder over class names, UNet2DConditionModel,
AutoencoderKL, LCMScheduler) plus the in-domain judge, saved into `--out`. Stages run in order and each reads the
previous one's output, so a long run can be split across calls:

    python scripts/train_embedded.py --stage vae,judge,teacher --out build/embedded
    python scripts/train_embedded.py --stage distill,eval --out build/embedded

Distillation follows Latent Consistency Models (Luo et al. 2023, the diffusers `train_lcm_distill_sd_wds.py` recipe):
a DDIM solver over 50 of the 1000 training timesteps, classifier-free guidance of the teacher baked into the student
at a fixed scale, an EMA target network and a pseudo-Huber loss; sampling uses diffusers' stock `LCMScheduler`.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qsched_search.embedded.judge import FashionJudge, load_judge, save_judge  # noqa: E402
from qsched_search.embedded.vocab import CLASS_NAMES, MAX_LENGTH, build_clip_tokenizer  # noqa: E402

GUIDANCE = 3.0  # teacher CFG scale baked into the student
DDIM_STEPS = 50  # the solver's skipping schedule; also LCMScheduler's original_inference_steps
SCHEDULER_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "train_log.txt", "a") as f:
        f.write(line + "\n")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(read_idx(folder / f"{prefix}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    return images, labels


def to_model_space(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1], padded with the black background."""
    x = images_u8.float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


def crop_to_judge(images01: torch.Tensor) -> torch.Tensor:
    """(N, 1, 32, 32) in [0, 1] -> the centre 28x28 that the judge and the real data use."""
    return images01[..., 2:30, 2:30]


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 200) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = lr


class Budget:
    """Iterations of one training loop, cut to fit `seconds` once the first 50 have been timed.

    The cosine schedule reads `total`, so a cut run still anneals to zero instead of stopping mid-schedule.
    """

    def __init__(self, total: int, seconds: float, out: Path, name: str):
        self.total, self.seconds, self.out, self.name = total, seconds, out, name

    def __iter__(self):
        start = time.time()
        step = 0
        while step < self.total:
            if step == 50 and self.seconds > 0:
                per_step = (time.time() - start) / 50
                fit = int(self.seconds / per_step)
                if fit < self.total:
                    log(self.out, f"{self.name}: {per_step * 1000:.1f} ms/step, cutting {self.total} steps to {fit}")
                    self.total = fit
            yield step
            step += 1


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------- components


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def make_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: str) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


# ----------------------------------------------------------------------------------------------- stages


def stage_vae(args, out: Path, device: str) -> None:
    images, _ = load_fashion_mnist(args.data, "train")
    x_all = to_model_space(images).to(device)
    vae = make_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(args.seed)
    steps = Budget(args.vae_iters, args.seconds.get("vae", 0), out, "vae")
    for step in steps:
        cosine_lr(opt, 1e-3, step, steps.total)
        x = x_all[torch.randint(0, len(x_all), (args.batch,), device=device, generator=g)]
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=g)
            recon = vae.decode(z).sample
        recon = recon.float()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps.total // 20) == 0 or step == steps.total - 1:
            log(out, f"vae step {step} rec {rec.item():.4f} kl/dim {kl.item():.3f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i : i + 1024]).latent_dist.mode() for i in range(0, 8192, 1024)])
        scaling = float(1.0 / z.float().std())
        test_images, _ = load_fashion_mnist(args.data, "test")
        xt = to_model_space(test_images[:1024]).to(device)
        mse = F.mse_loss(vae.decode(vae.encode(xt).latent_dist.mode()).sample, xt).item()
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out / "vae")
    log(out, f"vae saved: scaling_factor {scaling:.4f}, test reconstruction mse {mse:.5f} (pixels in [-1, 1])")


def stage_judge(args, out: Path, device: str) -> None:
    images, labels = load_fashion_mnist(args.data, "train")
    test_images, test_labels = load_fashion_mnist(args.data, "test")
    x_all = (images.float() / 255.0).unsqueeze(1).to(device)
    y_all = labels.to(device)
    judge = FashionJudge().to(device).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    steps = Budget(args.judge_iters, args.seconds.get("judge", 0), out, "judge")
    for step in steps:
        cosine_lr(opt, 2e-3, step, steps.total)
        idx = torch.randint(0, len(x_all), (args.batch,), device=device, generator=g)
        x = x_all[idx]
        # Random shifts of up to 2 pixels: generated samples are not pixel-aligned with the dataset.
        dx, dy = torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(step)).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(judge(x), y_all[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps.total // 10) == 0:
            log(out, f"judge step {step} loss {loss.item():.4f}")
    judge.eval()
    with torch.no_grad():
        xt = (test_images.float() / 255.0).unsqueeze(1).to(device)
        pred = torch.cat([judge(xt[i : i + 1000]).argmax(1) for i in range(0, len(xt), 1000)])
        acc = (pred.cpu() == test_labels).float().mean().item()
    save_judge(judge.cpu(), out / "judge", {"test_accuracy": acc, "test_images": len(test_labels), "classes": list(CLASS_NAMES)})
    log(out, f"judge saved: test accuracy {acc:.4f} on {len(test_labels)} images")


def _latents_and_prompts(args, out: Path, device: str):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval()
    images, labels = load_fashion_mnist(args.data, "train")
    x_all = to_model_space(images).to(device)
    with torch.no_grad():
        dists = [vae.encode(x_all[i : i + 2048]).latent_dist for i in range(0, len(x_all), 2048)]
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    return mean, std, labels.to(device), vae.config.scaling_factor


def stage_teacher(args, out: Path, device: str) -> None:
    from diffusers import DDPMScheduler

    mean, std, labels, scaling = _latents_and_prompts(args, out, device)
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder = make_text_encoder(len(tokenizer)).to(device).train()
    unet = make_unet().to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    log(out, f"teacher unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    noise_scheduler = DDPMScheduler(**SCHEDULER_KW)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    prompts = list(CLASS_NAMES) + [""]
    g = torch.Generator(device=device).manual_seed(args.seed + 2)
    steps = Budget(args.teacher_iters, args.seconds.get("teacher", 0), out, "teacher")
    for step in steps:
        cosine_lr(opt, args.lr, step, steps.total)
        idx = torch.randint(0, len(mean), (args.batch,), device=device, generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=device, generator=g)) * scaling
        # 10% empty prompts train the unconditional branch for classifier-free guidance.
        drop = torch.rand(args.batch, device=device, generator=g) < 0.1
        prompt_idx = torch.where(drop, torch.full_like(labels[idx], len(CLASS_NAMES)), labels[idx])
        noise = torch.randn(z0.shape, device=device, generator=g)
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
        zt = noise_scheduler.add_noise(z0, noise, t)
        with autocast(device):
            table = encode_prompts(tokenizer, text_encoder, prompts, device)
            pred = unet(zt, t, encoder_hidden_states=table[prompt_idx]).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % max(1, steps.total // 20) == 0 or step == steps.total - 1:
            log(out, f"teacher step {step} loss {loss.item():.4f}")
    ema.save_pretrained(out / "teacher_unet")
    text_encoder.eval().save_pretrained(out / "text_encoder")
    log(out, "teacher saved")


def lcm_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(**SCHEDULER_KW, original_inference_steps=DDIM_STEPS, timestep_scaling=10.0,
                        set_alpha_to_one=True, clip_sample=False, prediction_type="epsilon", steps_offset=1)


def stage_distill(args, out: Path, device: str) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    mean, std, labels, scaling = _latents_and_prompts(args, out, device)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").to(device).eval().requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(out / "teacher_unet").to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).eval()
    boundary = lcm_scheduler()
    alphas = boundary.alphas_cumprod.to(device)
    skip = 1000 // DDIM_STEPS
    ddim_timesteps = torch.arange(1, DDIM_STEPS + 1, device=device) * skip - 1  # 19, 39, ..., 999

    def scalings(t: torch.Tensor):
        c_skip, c_out = boundary.get_scalings_for_boundary_condition_discrete(t.float())
        return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)

    def x0_from_eps(z, eps, t):
        a = alphas[t].view(-1, 1, 1, 1)
        return (z - (1 - a).sqrt() * eps) / a.sqrt()

    with torch.no_grad():
        table = encode_prompts(tokenizer, text_encoder, list(CLASS_NAMES) + [""], device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.distill_lr, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(args.seed + 3)
    huber_c = 0.001
    steps = Budget(args.distill_iters, args.seconds.get("distill", 0), out, "distill")
    for step in steps:
        cosine_lr(opt, args.distill_lr, step, steps.total, warmup=100)
        idx = torch.randint(0, len(mean), (args.batch,), device=device, generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=device, generator=g)) * scaling
        cond = table[labels[idx]]
        uncond = table[len(CLASS_NAMES)].expand_as(cond)
        n = torch.randint(0, DDIM_STEPS, (args.batch,), device=device, generator=g)
        t_start = ddim_timesteps[n]
        t_prev = (t_start - skip).clamp(min=0)
        noise = torch.randn(z0.shape, device=device, generator=g)
        a_start = alphas[t_start].view(-1, 1, 1, 1)
        z_start = a_start.sqrt() * z0 + (1 - a_start).sqrt() * noise
        c_skip_s, c_out_s = scalings(t_start)
        c_skip_p, c_out_p = scalings(t_prev)
        with autocast(device):
            eps_student = student(z_start, t_start, encoder_hidden_states=cond).sample.float()
        pred = c_skip_s * z_start + c_out_s * x0_from_eps(z_start, eps_student, t_start)
        with torch.no_grad(), autocast(device):
            eps_both = teacher(torch.cat([z_start, z_start]), torch.cat([t_start, t_start]),
                               encoder_hidden_states=torch.cat([cond, uncond])).sample.float()
            eps_c, eps_u = eps_both.chunk(2)
            eps_t = eps_u + GUIDANCE * (eps_c - eps_u)
            x0_t = x0_from_eps(z_start, eps_t, t_start)
            a_prev = alphas[t_prev].view(-1, 1, 1, 1)
            z_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t  # one DDIM step of the guided teacher
            eps_target = target(z_prev, t_prev, encoder_hidden_states=cond).sample.float()
            tgt = c_skip_p * z_prev + c_out_p * x0_from_eps(z_prev, eps_target, t_prev)
        loss = (torch.sqrt((pred - tgt) ** 2 + huber_c**2) - huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, p in zip(target.parameters(), student.parameters()):
                pt.lerp_(p, 1 - args.target_ema)
        if step % max(1, steps.total // 20) == 0 or step == steps.total - 1:
            log(out, f"distill step {step} loss {loss.item():.5f}")
    target.save_pretrained(out / "student_unet")
    log(out, "student (EMA target) saved")


def build_pipeline(out: Path, unet_folder: str, scheduler):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(out / unet_folder),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_images(pipe, n: int, steps: int, guidance: float, seed: int, device: str, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """n samples, prompts cycling through the classes, as uint8 (n, 28, 28) plus their labels."""
    labels = np.arange(n) % len(CLASS_NAMES)
    chunks = []
    for start in range(0, n, batch):
        lab = labels[start : start + batch]
        gen = torch.Generator(device=device).manual_seed(seed + start)
        images = pipe([CLASS_NAMES[i] for i in lab], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gen, output_type="pt", height=32, width=32).images
        chunks.append((crop_to_judge(images.float().clamp(0, 1))[:, 0] * 255).round().byte().cpu().numpy())
    return np.concatenate(chunks), labels


@torch.no_grad()
def judge_stats(judge, images_u8: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(images_u8).float().div(255).unsqueeze(1).to(device)
    feats = torch.cat([judge.features(x[i : i + 1000]) for i in range(0, len(x), 1000)]).double().cpu().numpy()
    logits = torch.cat([judge(x[i : i + 1000]) for i in range(0, len(x), 1000)]).cpu().numpy()
    return feats, logits


def stage_eval(args, out: Path, device: str) -> None:
    from cleanfid.fid import frechet_distance
    from diffusers import DDIMScheduler

    pipe = build_pipeline(out, "student_unet", lcm_scheduler())
    pipe.save_pretrained(out / "model", safe_serialization=True)
    judge = load_judge(out / "judge", device)
    test_images, _ = load_fashion_mnist(args.data, "test")
    real_feats, _ = judge_stats(judge, test_images.numpy(), device)
    mu_r, sigma_r = real_feats.mean(0), np.cov(real_feats, rowvar=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    teacher = build_pipeline(out, "teacher_unet", DDIMScheduler(**SCHEDULER_KW, clip_sample=False, set_alpha_to_one=False, steps_offset=1)).to(device)
    teacher.set_progress_bar_config(disable=True)
    runs = [("teacher", teacher, DDIM_STEPS, GUIDANCE)] + [("student", pipe, s, 0.0) for s in (1, 2, 4, 8)]
    rows, arrays = [], {}
    for name, p, steps, guidance in runs:
        t0 = time.time()
        images, labels = sample_images(p, args.eval_samples, steps, guidance, args.seed + 1000, device)
        feats, logits = judge_stats(judge, images, device)
        acc = float((logits.argmax(1) == labels).mean())
        fd = float(frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r))
        rows.append({"model": name, "steps": steps, "guidance": guidance, "samples": len(images),
                     "alignment_accuracy": acc, "judge_fd": fd, "seconds": round(time.time() - t0, 1)})
        arrays[f"{name}_{steps}"] = images
        log(out, f"eval {name} {steps} steps: alignment accuracy {acc:.4f}, judge FD {fd:.3f}")
    arrays["labels"] = labels
    np.savez_compressed(out / "eval_samples.npz", **arrays)
    (out / "eval_metrics.json").write_text(json.dumps(rows, indent=2))


STAGES = {"vae": stage_vae, "judge": stage_judge, "teacher": stage_teacher, "distill": stage_distill, "eval": stage_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="vae,judge,teacher,distill,eval", help="comma-separated stages, in order")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vae-iters", type=int, default=4000)
    parser.add_argument("--judge-iters", type=int, default=3000)
    parser.add_argument("--teacher-iters", type=int, default=12000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--distill-iters", type=int, default=6000)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--target-ema", type=float, default=0.95)
    parser.add_argument("--seconds", type=lambda v: {k: float(x) for k, x in (kv.split("=") for kv in v.split(","))},
                        default={}, help="time limits per training stage, e.g. vae=60,teacher=300: iterations are cut to fit")
    parser.add_argument("--eval-samples", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log(args.out, f"args {vars(args)}; torch {torch.__version__}; device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    for name in args.stage.split(","):
        t0 = time.time()
        STAGES[name](args, args.out, args.device)
        log(args.out, f"stage {name} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
