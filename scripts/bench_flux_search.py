"""Times `qsched probe` + `qsched search` of the FLUX.1-schnell config phase by phase (issue 18, GPU row).

Three subcommands, run by scripts/bench_flux_search.sh on the GPU machine:

- `build DIR`: the stock FluxPipeline of scripts/bench_fidelity.py `_flux_pipeline` (the full FLUX.1-schnell
  transformer config with random weights, seed 0; the full VAE config; tiny random CLIP and T5 text encoders),
  written with `save_pretrained` to DIR, so that the CLI loads it with `--model DIR`. Writes DIR/bench_build.json
  (seconds to build and to save). The same seed on the same machine gives the same weights bit for bit, which a
  resumed probe or search checks through the denoiser's sha256 in its fingerprint.
- `kernels OUT.json`: one FLUX MLP Linear (3072 -> 12288) at the probe's rows per call (batch x 4,352 tokens) in
  bf16, fp8, w8a8 and w4a16 (torchao, eager, the kernels `qsched` picks): ms per call, so the script can leave out
  w4a16 when its tinygemm kernel (one aten op: eager is its real speed) is far slower than bf16 at this shape.
  Eager int8 W8A8 is not its compiled speed (the bank compiles it, and inductor fuses the int matmul with its
  rescale), so that number decides nothing.
- `summarize STATE... --out FILE.csv`: one row per timed command (every *_timings.json in the STATE folders): seconds
  per phase, so that a README table says where the time goes.
- `cli TIMINGS.json -- ARGS...`: runs `qsched ARGS...` (the typer app, as `python -m qsched_search ARGS` does) in
  this process with timers around its phases: model load, the weights fingerprint, the recorded denoiser call, the
  bank build (torchao quantization per level), each denoiser call (the first per level and shape includes its
  torch.compile), the VAE decode, prompt encoding, image health checks, metrics, each evaluation, and the study.
  Nothing the CLI computes changes; the timers synchronize the GPU around denoiser calls and VAE decodes only.

    python scripts/bench_flux_search.py build /tmp/flux-random               # on the GPU machine (about 24 GB)
    python scripts/bench_flux_search.py cli /tmp/t.json -- probe --model /tmp/flux-random --family flux-schnell ...
    python scripts/bench_flux_search.py build /tmp/flux-tiny --tiny --device cpu   # the script, checked on a CPU
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------- build


def build(args) -> None:
    import bench_fidelity

    from qsched_search.results.io import write_json

    if args.tiny:  # the script checked on a CPU: one block of each kind, two heads (the text encoders' widths stay)
        bench_fidelity.FLUX_TRANSFORMER = dict(bench_fidelity.FLUX_TRANSFORMER, num_layers=1, num_single_layers=1,
                                               num_attention_heads=2)
    folder = Path(args.dir)
    started = time.perf_counter()
    pipe = bench_fidelity._flux_pipeline(args.device)
    _sync()
    built = time.perf_counter() - started
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"[bench] built the pipeline in {built:.1f} s: transformer {params / 1e9:.3f} B parameters", flush=True)
    started = time.perf_counter()
    pipe.save_pretrained(str(folder))
    os.sync()
    saved = time.perf_counter() - started
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"[bench] saved {size / 2**30:.2f} GiB to {folder} in {saved:.1f} s", flush=True)
    write_json(folder / "bench_build.json", {
        "what": "scripts/bench_fidelity.py _flux_pipeline (seed 0), save_pretrained", "tiny": args.tiny,
        "transformer_config": bench_fidelity.FLUX_TRANSFORMER, "transformer_parameters": params,
        "build_s": built, "save_s": saved, "folder_bytes": size, "device": args.device,
        "torch": torch.__version__})


# ----------------------------------------------------------------------------------------------------- kernels


def kernels(args) -> None:
    from torch import nn

    from qsched_search.quant.kernels import kernel_for, torchao
    from qsched_search.quant.levels import load_menu
    from qsched_search.results.io import write_json

    menu = load_menu()
    rows = args.batch * 4352  # 1024 px: 64 x 64 packed latent tokens + 256 text tokens
    x = torch.randn(rows, 3072, device="cuda", dtype=torch.bfloat16)
    out = {"shape": f"{rows}x3072 @ 3072x12288", "rows": rows, "note": "eager torchao, one Linear", "ms": {}}
    for level in args.levels.split(","):
        layer = nn.Sequential(nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)).requires_grad_(False)
        choice = kernel_for(menu[level], "bfloat16")
        if not choice.is_identity:
            torchao().quantize_(layer, choice.config())
        with torch.no_grad():
            for _ in range(3):
                layer(x)
            _sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                layer(x)
            end.record()
            _sync()
        out["ms"][level] = start.elapsed_time(end) / 10
        print(f"[bench] {level}: {out['ms'][level]:.3f} ms per call ({choice.kernel})", flush=True)
        del layer
    write_json(Path(args.json), out)


# ----------------------------------------------------------------------------------------------------- cli


class Timings:
    """Seconds per named phase (total and count) and a list of events, written as JSON when the process ends."""

    def __init__(self, path: Path):
        self.path = path
        self.phases: dict[str, dict] = {}
        self.events: list[dict] = []
        self.first_calls: dict[str, float] = {}
        self.calls: dict[str, dict] = {}
        self.meta: dict = {}

    def add(self, name: str, seconds: float) -> None:
        row = self.phases.setdefault(name, {"seconds": 0.0, "count": 0})
        row["seconds"] += seconds
        row["count"] += 1

    def event(self, **fields) -> None:
        fields["t"] = round(time.perf_counter() - STARTED, 3)
        self.events.append(fields)
        print("[bench] " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def write(self) -> None:
        self.meta["process_s"] = time.perf_counter() - STARTED
        data = {"meta": self.meta, "phases": self.phases, "first_calls_s": self.first_calls,
                "denoiser_calls": self.calls, "events": self.events}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _wrap(owner, name: str, timings: Timings, label: str, sync: bool = False, report: bool = False, describe=None):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*a, **k):
        if sync:
            _sync()
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            if sync:
                _sync()
            seconds = time.perf_counter() - started
            timings.add(label, seconds)
            if report:
                timings.event(phase=label, s=round(seconds, 3), **(describe(*a, **k) if describe else {}))

    setattr(owner, name, wrapper)


def _levels_of(self, levels, *a, **k) -> dict:
    return {"levels": ",".join(str(getattr(lv, "key", lv)) for lv in levels)}


def instrument(timings: Timings) -> None:
    import diffusers
    from diffusers import AutoencoderKL

    import qsched_search.pipeline.rollout as rollout
    import qsched_search.session as session
    from qsched_search.eval.evaluate import ScheduleEvaluator
    from qsched_search.pipeline.loading import LoadedModel
    from qsched_search.quant.torchao_bank import RealKernelBank

    _wrap(session, "load_model", timings, "load_model", sync=True, report=True)
    _wrap(LoadedModel, "weights_sha256", timings, "weights_sha256", report=True)
    _wrap(session, "capture_denoiser_call", timings, "capture_denoiser_call", sync=True, report=True)
    _wrap(session, "build_bank", timings, "build_bank", sync=True, report=True)
    _wrap(RealKernelBank, "_build", timings, "quantize_level", sync=True, report=True,
          describe=lambda self, name: {"level": name})
    _wrap(AutoencoderKL, "decode", timings, "vae_decode", sync=True)
    _wrap(diffusers.FluxPipeline, "encode_prompt", timings, "encode_prompt")
    _wrap(rollout, "image_problems", timings, "health_check")
    _wrap(rollout.Runner, "run", timings, "rollout")
    _wrap(ScheduleEvaluator, "score", timings, "metrics")
    _wrap(ScheduleEvaluator, "evaluate", timings, "evaluate", report=True, describe=_levels_of)

    original_forward = RealKernelBank._forward

    def forward(self, *a, **k):
        assignment = self._state.assignment
        hidden = k.get("hidden_states", a[0] if a else None)
        key = f"{assignment.key}|{tuple(hidden.shape) if hasattr(hidden, 'shape') else '?'}"
        _sync()
        started = time.perf_counter()
        out = original_forward(self, *a, **k)
        _sync()
        seconds = time.perf_counter() - started
        if key not in timings.first_calls:
            timings.first_calls[key] = seconds
            timings.add("denoiser_first_calls (compile)", seconds)
            timings.event(phase="first_call", key=key, s=round(seconds, 3))
        else:
            row = timings.calls.setdefault(key, {"seconds": 0.0, "count": 0})
            row["seconds"] += seconds
            row["count"] += 1
            timings.add("denoiser_calls", seconds)
        return out

    RealKernelBank._forward = forward

    from qsched_search.search import probe as probe_mod
    from qsched_search.search import stage as stage_mod
    from qsched_search.search.study import ScheduleSearch

    for mod, name in ((probe_mod, "run_probe"), (probe_mod, "write_probe")):
        _wrap(mod, name, timings, name, report=True)
    _wrap(stage_mod, "run_search", timings, "run_search", report=True)
    _wrap(ScheduleSearch, "run", timings, "study.run", report=True)
    # The CLI modules import these names inside the command functions, from the modules patched above.


def cli(args, rest: list[str]) -> None:
    timings = Timings(Path(args.json))
    timings.meta.update(argv=rest, started_unix=time.time(), imports_s=None)
    atexit.register(timings.write)
    instrument(timings)
    if os.environ.get("QSB_CALL_DEFAULTS"):  # the CPU check of this script: a small resolution for the family
        import dataclasses

        import qsched_search.pipeline.loading as loading

        extra = json.loads(os.environ["QSB_CALL_DEFAULTS"])
        for name in ("load_family", "detect_family"):
            original = getattr(loading, name)
            setattr(loading, name, lambda *a, _o=original, **k: dataclasses.replace(
                _o(*a, **k), call_defaults={**_o(*a, **k).call_defaults, **extra}))
    from qsched_search.cli.app import app

    timings.meta["imports_s"] = time.perf_counter() - STARTED
    started = time.perf_counter()
    code = 0
    try:
        app(args=rest, prog_name="qsched")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        timings.meta["command_s"] = time.perf_counter() - started
        timings.meta["exit_code"] = code
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            timings.meta["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print("[bench] phases (s, count): " + ", ".join(f"{k} {v['seconds']:.1f} ({v['count']})"
                                                        for k, v in timings.phases.items()), flush=True)
        print(f"[bench] command {timings.meta['command_s']:.1f} s, exit {code}", flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------------- summarize

COLUMNS = ("imports", "load_model", "capture_denoiser_call", "build_bank", "weights_sha256", "compile_first_calls",
           "denoiser_calls", "vae_decode", "rollout_other", "metrics", "rest", "command", "process", "evaluations",
           "s_per_evaluation")


def summarize(args) -> None:
    import csv

    rows = []
    for state in args.states:
        for path in sorted(Path(state).glob("*_timings*.json")):
            data = json.loads(path.read_text())
            ph = {k: v["seconds"] for k, v in data["phases"].items()}
            meta = data["meta"]
            get = lambda k: ph.get(k, 0.0)  # noqa: E731
            first = get("denoiser_first_calls (compile)")
            # Prompt encoding (tiny encoders), image health checks, images to the CPU, the scheduler, Python. (One prompt
            # encode, the recorded call's, is outside rollouts: under 0.1 s.)
            rollout_other = get("rollout") - first - get("denoiser_calls") - get("vae_decode")
            counted = (get("load_model") + get("capture_denoiser_call") + get("build_bank") + get("weights_sha256")
                       + get("rollout") + get("metrics"))
            evaluations = data["phases"].get("evaluate", {}).get("count", 0)
            row = {"folder": Path(state).name, "file": path.name, "command": round(meta["command_s"], 1),
                   "process": round(meta["process_s"], 1), "imports": round(meta["imports_s"], 1),
                   "exit_code": meta["exit_code"], "evaluations": evaluations,
                   "s_per_evaluation": round(get("evaluate") / evaluations, 2) if evaluations else "",
                   "compile_first_calls": round(first, 1), "rollout_other": round(rollout_other, 1),
                   "rest": round(meta["command_s"] - counted, 1)}
            for k in ("load_model", "capture_denoiser_call", "build_bank", "weights_sha256", "denoiser_calls",
                      "vae_decode", "metrics"):
                row[k] = round(get(k), 1)
            row["first_calls"] = "; ".join(f"{k.split('|')[0]} {v:.1f}" for k, v in data["first_calls_s"].items())
            row["s_per_denoiser_call"] = "; ".join(f"{k.split('|')[0]} {v['seconds'] / v['count']:.3f}"
                                                   for k, v in data["denoiser_calls"].items())
            rows.append(row)
    fields = ["folder", "file", "exit_code", *COLUMNS, "first_calls", "s_per_denoiser_call"]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(", ".join(f"{k}={row[k]}" for k in fields))


def main() -> None:
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir")
    b.add_argument("--device", default="cuda")
    b.add_argument("--tiny", action="store_true")
    k = sub.add_parser("kernels")
    k.add_argument("json")
    k.add_argument("--batch", type=int, default=16)
    k.add_argument("--levels", default="bf16,fp8,w8a8,w4a16")
    m = sub.add_parser("summarize")
    m.add_argument("states", nargs="+")
    m.add_argument("--out", required=True)
    c = sub.add_parser("cli")
    c.add_argument("json")
    args = parser.parse_args(argv)
    if args.what == "build":
        build(args)
    elif args.what == "kernels":
        kernels(args)
    elif args.what == "summarize":
        summarize(args)
    else:
        cli(args, rest)


if __name__ == "__main__":
    main()
