"""Multi-GPU search: one Optuna study, one `qsched search` worker per GPU; throughput, scaling, nothing lost or twice.

For each worker count k of --workers (capped at the host's GPU count on CUDA), a fresh study in one storage and k
worker processes, worker i seeing only GPU i (CUDA_VISIBLE_DEVICES), each running `qsched search --sampler
exhaustive` over the same space until every schedule is measured. Throughput counts the measuring trials over the
span between the first trial's start and the last one's end (the model loads are left out: they happen once per
worker, not per schedule). A last run with the most workers SIGKILLs worker 0 while it measures a trial; the
others must retry that trial (Optuna's heartbeat: after 10 x `--heartbeat` seconds). Each run's Pareto front (over
its study's trials, as `qsched search` computes it) is compared with the single-worker front.

Storage: a PostgreSQL server started for the benchmark on 127.0.0.1 (Debian's initdb/pg_ctl, and psycopg2) when the
host has one, a fresh database per run; otherwise an SQLite file per run, which Optuna's FAQ advises against for many
parallel writers but serves a handful of workers that each write once per evaluation (the summary says which).

    python scripts/bench_multigpu.py --device cpu --workers 1,2 --out /tmp/mg            # the embedded model, CPU check
    python scripts/bench_multigpu.py --build-sdxl /tmp/sdxl --device cuda --dtype bfloat16 --workers 1,2,4 \\
        --steps 4 --precisions fp8,w8a8,w4a8 --samples 4 --out results/bench/multigpu      # the multi-GPU run

`--build-sdxl DIR` first writes a random-weight pipeline of the SDXL-Turbo architecture to DIR/sdxl-turbo-random (the real SDXL UNet
config, `--sdxl-blocks` transformer layers per block; small random text encoders and VAE with SDXL's interface
sizes) and searches it; `--model` takes any diffusers pipeline folder or `embedded`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from qsched_search.results.io import write_csv, write_json, write_text  # noqa: E402
from qsched_search.results.provenance import command_line, device_name, now, versions  # noqa: E402
from tests.reliability import running_trial  # noqa: E402

COLUMNS = ["run", "workers", "gpus", "schedules", "measured", "evals_per_min", "efficiency", "lost", "duplicated",
           "killed_trial", "retried", "taken_over", "front_equal", "span_s", "wall_s", "storage"]


# ------------------------------------------------------------------------------------------- the model


def build_sdxl(folder: Path, blocks: int, tiny: bool = False) -> Path:
    """A random-weight SDXL-Turbo-architecture pipeline saved to `folder`/sdxl-turbo-random (bf16 weights; the
    folder name selects the sdxl-turbo family: Euler ancestral, trailing timesteps).

    The UNet is SDXL's (scripts/bench_gpu.py `SDXL_UNET`) with `blocks` transformer layers where SDXL has 2 and 10;
    the text encoders and VAE are small random models with SDXL's interface sizes (2 x 77 tokens of 768 + 1280
    features, a 1280-d pooled embedding, 4 latent channels at 1/8 of the resolution), so the UNet holds the cost.
    """
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from qsched_search.embedded.vocab import build_clip_tokenizer
    from scripts.bench_gpu import SDXL_UNET

    torch.manual_seed(0)
    config = dict(SDXL_UNET)
    if tiny:  # the same wiring at a size a CPU builds in seconds (tests)
        config.update(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
                      norm_num_groups=8)
    else:
        config["transformer_layers_per_block"] = [min(n, blocks) for n in (1, 2, 10)]
    unet = UNet2DConditionModel(**config)
    tokenizer = build_clip_tokenizer()

    def encoder(hidden: int, cls):
        return cls(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, projection_dim=1280,
                                  intermediate_size=hidden * 2, num_attention_heads=8, num_hidden_layers=1,
                                  vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length))

    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=1024, scaling_factor=0.13025)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder(768, CLIPTextModel),
                                     text_encoder_2=encoder(1280, CLIPTextModelWithProjection), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    folder = Path(folder) / "sdxl-turbo-random"
    pipe.to(torch.bfloat16).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- the storage


class Storages:
    """One fresh database per run, so that no run answers a schedule from another run's measurements (a search
    reuses every measurement in its storage): a database per run on one PostgreSQL server started for the
    benchmark on 127.0.0.1 (Debian's initdb/pg_ctl, and psycopg2) when the host has one, else an SQLite file per
    run; with --storage URL, that server (PostgreSQL) gets the databases."""

    def __init__(self, kind: str, folder: Path):
        self.folder, self.server, self.base = folder, None, None
        if kind not in ("auto", "postgres", "sqlite"):
            self.base, self.description = kind, "PostgreSQL at the given URL, a database per run"
            return
        if kind in ("auto", "postgres"):
            from tests.pg_server import PostgresServer, find_bin_dir

            bin_dir = find_bin_dir()
            if bin_dir is not None:
                self.server = PostgresServer(bin_dir).start()
                self.base = self.server.url
                self.description = f"PostgreSQL ({bin_dir}) on 127.0.0.1:{self.server.port}, a database per run"
                return
            if kind == "postgres":
                raise SystemExit("--storage postgres: no initdb/pg_ctl found; apt-get install postgresql, or --storage sqlite")
        self.description = "SQLite, a file per run (no PostgreSQL on this host; one host, a few workers)"

    def url(self, name: str) -> str:
        if self.base is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{(self.folder / f'{name}.db').resolve()}"
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.base, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.base.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# ------------------------------------------------------------------------------------------- one run


def search_args(args, url: str, study: str, out: Path) -> list[str]:
    argv = ["--model", args.model, "--steps", str(args.steps), "--precisions", args.precisions,
            "--reference", args.reference, "--samples", str(args.samples), "--objective", args.objective,
            "--images", "0", "--sampler", "exhaustive", "--device", args.device, "--dtype", args.dtype,
            "--batch-size", str(args.batch_size), "--storage", url, "--study", study,
            "--heartbeat", str(args.heartbeat), "--budget", str(args.budget), "--out", str(out)]
    return argv


def worker_env(args, index: int, gpus: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    else:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run(args, k: int, gpus: int, url: str, storage, out: Path, kill: bool) -> dict:
    study = f"multigpu-{args.tag}-k{k}" + ("-kill" if kill else "")
    command = [sys.executable, "-m", "qsched_search", "search"]
    started = time.time()
    procs, logs = [], []
    for i in range(k):
        log = out / f"worker{i}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        logs.append(log)
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([*command, *search_args(args, url, study, out / f"worker{i}")],
                                          env=worker_env(args, i, gpus), stdout=handle, stderr=subprocess.STDOUT))
    killed = None
    try:
        if kill:
            # Kill worker 0 in the middle of a trial, once the others have had time to get going.
            deadline = time.time() + args.timeout
            while killed is None and time.time() < deadline and procs[0].poll() is None:
                done = _measured(storage, study)
                if done >= args.kill_after:
                    killed = running_trial(storage, study, procs[0].pid)
                time.sleep(0.05 if killed is None else 0)
            if killed is not None:
                os.kill(procs[0].pid, signal.SIGKILL)
                procs[0].wait(timeout=60)
        for i, p in enumerate(procs):
            code = p.wait(timeout=args.timeout)
            if code != 0 and not (i == 0 and killed is not None):
                raise SystemExit(f"worker {i} of {k} exited with {code}: see {logs[i]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = time.time() - started
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    measuring = [t for t in trials if "evaluation" in t.user_attrs and t.user_attrs.get("source") != "cache"
                 and t.datetime_start and t.datetime_complete]
    keys = [t.user_attrs["schedule"] for t in measuring]
    span = (max(t.datetime_complete for t in measuring) - min(t.datetime_start for t in measuring)).total_seconds()
    space = (len(args.precisions.split(",")) + 1) ** args.steps
    if killed is not None:
        # The trial seen running may have finished in the moment before the signal: the killed one is the victim's
        # trial that never completed (None if the signal fell between two of its trials).
        victim = f"{socket.gethostname()}:{procs[0].pid}"
        cut = [t.number for t in trials if t.user_attrs.get("worker") == victim and t.state != optuna.trial.TrialState.COMPLETE]
        # A trial killed before it recorded its worker: the only dead worker's, if the heartbeat check retried it.
        cut = cut or sorted({t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs})
        killed = cut[0] if cut else None
    retried = killed is not None and any(t.system_attrs.get("failed_trial") == killed for t in trials)
    # A killed trial may have been waiting on a lower-numbered trial of another worker that claimed the same
    # schedule (both proposed it at once): that one measures it, so there is nothing to retry.
    claim = next((t.user_attrs.get("claim") for t in trials if t.number == killed), None)
    taken_over = claim is not None and any(t.number != killed and t.user_attrs.get("schedule") == claim
                                           and "evaluation" in t.user_attrs and t.datetime_complete for t in trials)
    return {"workers": k, "gpus": min(k, gpus) if args.device.startswith("cuda") else 0, "schedules": space,
            "measured": len(set(keys)), "evals_per_min": len(keys) / span * 60 if span > 0 else float("nan"),
            "lost": space - len(set(keys)), "duplicated": len(keys) - len(set(keys)), "killed_trial": killed,
            "retried": retried if killed is not None else None,
            "taken_over": (retried or taken_over) if killed is not None else None, "span_s": round(span, 2), "wall_s": round(wall, 2),
            "front": study_front(trials, args.objective)}


def _measured(storage, study: str) -> int:
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return 0
    return sum(1 for t in trials if t.state == optuna.trial.TrialState.COMPLETE)


def study_front(trials, metric: str) -> list[tuple[str, float, float]]:
    """(schedule, cost, value) of the study's Pareto front, by cost: `qsched search`'s own front over its trials."""
    from qsched_search.results.metric_facts import facts
    from qsched_search.results.tables import pareto_front

    rows = [{"trial": t.number, "schedule": t.user_attrs["schedule"], "state": t.state.name, "cost": t.user_attrs.get("cost"),
             "value": t.user_attrs["evaluation"]["estimates"][metric][0]}
            for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "evaluation" in t.user_attrs]
    front = pareto_front(pd.DataFrame(rows), facts(metric).higher_is_better).sort_values(["cost", "schedule"])
    return [(s, float(c), float(v)) for s, c, v in zip(front["schedule"], front["cost"], front["value"])]


def same_front(a, b, tolerance: float) -> bool:
    """Same schedules and costs; values within `tolerance` (GPU kernels are not bit-deterministic across cards)."""
    return len(a) == len(b) and all(x[0] == y[0] and abs(x[1] - y[1]) < 1e-9 and abs(x[2] - y[2]) <= tolerance
                                    for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- main


def plot(frame: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    base = frame.evals_per_min.iloc[0]
    ax.plot(frame.workers, frame.evals_per_min, "o-", label="measured")
    ax.plot(frame.workers, base * frame.workers, "--", color="grey", label="linear")
    ax.set_xlabel("workers")
    ax.set_ylabel("schedules evaluated per minute")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="Worker counts, comma-separated; 1 must be first.")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--build-sdxl", default="", help="Write a random-weight SDXL-architecture pipeline here and search it.")
    parser.add_argument("--sdxl-blocks", type=int, default=10, help="Transformer layers per SDXL block, at most (SDXL: 2 and 10).")
    parser.add_argument("--tiny", action="store_true", help="--build-sdxl at a tiny size (a CPU check of the builder).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--share-gpus", action="store_true", help="More workers than GPUs: worker i on GPU i mod G "
                        "(checks the machinery on a one-GPU host; its scaling says nothing of several GPUs).")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reference", default="fp32", help="The reference level (the pipeline's own precision).")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precisions", default="w8a8,w4a4")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--objective", default="ssim", help="ssim needs no metric weights; lpips does.")
    # Every schedule is measured whatever the budget; it must only admit one (under target torchao only Linear layers
    # quantize: on the embedded model even all-w4a4 costs ~0.66 of fp32).
    parser.add_argument("--budget", type=float, default=0.9)
    parser.add_argument("--storage", default="auto", help="auto | postgres | sqlite | a database URL.")
    parser.add_argument("--heartbeat", type=int, default=2, help="Seconds; a silent trial is retried after 10 of them.")
    parser.add_argument("--kill-after", type=int, default=2, help="Completed trials before worker 0 is killed.")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--tolerance", type=float, default=-1.0, help="Front value tolerance; 0 on CPU, 1e-3 on CUDA if < 0.")
    parser.add_argument("--timeout", type=float, default=3000)
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "multigpu"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    counts = [int(k) for k in args.workers.split(",")]
    if counts[0] != 1:
        raise SystemExit("--workers must start with 1: efficiency is relative to one worker")
    gpus = 0
    if args.device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("--device cuda but no GPU is visible")
        if max(counts) > gpus and not args.share_gpus:
            print(f"only {gpus} GPUs: worker counts above it are left out (--share-gpus runs them anyway)", flush=True)
            counts = [k for k in counts if k <= gpus]
    out = Path(args.out)
    work = out / "runs"
    if args.build_sdxl:
        t0 = time.time()
        args.model = str(build_sdxl(Path(args.build_sdxl), args.sdxl_blocks, tiny=args.tiny))
        print(f"built the random-weight SDXL pipeline in {time.time() - t0:.0f} s: {args.model}", flush=True)
    tolerance = args.tolerance if args.tolerance >= 0 else (1e-3 if args.device.startswith("cuda") else 0.0)
    args.tag = time.strftime("%Y%m%d_%H%M%S")
    storages = Storages(args.storage, work)
    described = storages.description
    rows = []
    try:
        # Throughput runs first, each on a fresh database; then the kill run, whose throughput includes the grace
        # period a dead worker's trial waits before it is retried.
        plan = [(k, False) for k in counts] + ([(max(counts), True)] if not args.no_kill and max(counts) > 1 else [])
        for k, kill in plan:
            name = f"multigpu_{args.tag}_k{k}" + ("_kill" if kill else "")
            url = storages.url(name)
            storage = optuna.storages.RDBStorage(url, engine_kwargs={} if url.startswith("sqlite") else {"pool_pre_ping": True})
            row = run(args, k, max(gpus, 1), url, storage, work / (f"k{k}" + ("-kill" if kill else "")), kill=kill)
            row["run"] = "kill one worker" if kill else "throughput"
            row["storage"] = described.split(" (")[0].split(",")[0]
            rows.append(row)
            print(f"{k} workers: {row['evals_per_min']:.1f} schedules/min, lost {row['lost']}, twice {row['duplicated']}, "
                  f"killed trial {row['killed_trial']}, retried {row['retried']}", flush=True)
    finally:
        storages.stop()
    single = rows[0]
    for row in rows:
        row["efficiency"] = row["evals_per_min"] / (row["workers"] * single["evals_per_min"])
        row["front_equal"] = same_front(row["front"], single["front"], tolerance)
    frame = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "scaling.csv", frame)
    device = device_name(args.device)
    plot(frame[frame.run == "throughput"], out / "scaling.png", f"{args.model.split('/')[-1]}, {args.steps} steps, {device}")
    write_json(out / "summary.json", {
        "command": command_line(), "device": device, "gpus": gpus, "date": now(), "versions": versions(),
        "storage": described, "model": args.model, "steps": args.steps, "precisions": args.precisions,
        "reference": args.reference, "samples": args.samples, "objective": args.objective, "dtype": args.dtype,
        "heartbeat_s": args.heartbeat, "front_tolerance": tolerance, "runs": frame.to_dict("records"),
        "fronts": {f"{r['run']}, {r['workers']} workers": r["front"] for r in rows}})
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |" for r in frame.itertuples(index=False)]
    write_text(out / "scaling.md", f"`{command_line()}` on {device}, {now()}; storage: {described}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
