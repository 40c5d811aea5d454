"""Times attention kernels at FLUX.1-schnell's shape and measures their error: SDPA bf16, FlexAttention, cuDNN fp8.

One GPU, batch 1, 24 heads of dim 128, 4352 tokens (4096 image + 256 text, 1024 px with max_sequence_length=256) and
4608 tokens (512 text tokens). q, k and v are random normal bf16 tensors stored (batch, tokens, heads, dim) as
diffusers' Flux attention produces them, and handed to every kernel as (batch, heads, tokens, dim) views.

Candidates:
  sdpa_bf16_default / _cudnn / _flash / _efficient  torch SDPA, default dispatch and each backend forced
  flex_bf16_compiled                                torch.compile(flex_attention)
  cudnn_fp8_per_tensor                              cuDNN's fp8 SDPA graph (nvidia-cudnn-frontend), q/k/v at amax/448
  cudnn_fp8_per_tensor_e2e                          the same with the eager quantization and the output dequantization
  cudnn_fp8_per_head                                one scale per (batch, head), if cuDNN builds that graph
  cudnn_fp8_bf16_out                                fp8 inputs, bf16 output (the frontend allows it on Blackwell only)
  sim_fp8_qkv_per_tensor / _per_head                no kernel: fp32 SDPA of fp8-rounded q/k/v, the input rounding alone

Errors are relative L2 norms, computed in float32, against two references: `rel_err_vs_sdpa_bf16` against the output
of torch SDPA in bf16 with the default backend (what the pipeline runs today), and `rel_err_vs_fp32` against torch
SDPA's math backend in float32 on the same bf16 inputs (the exact attention of those inputs). Times are the median
over repeats of the mean of back-to-back calls between two CUDA events, warm-up calls excluded.

Rows are written as soon as they are measured, so a run stopped by its time limit still leaves its data.

    python scripts/bench_attention.py --out results/attention             # on the GPU (scripts/device_attention.sh)
    python scripts/bench_attention.py --dry-run --out /tmp/attention      # CPU, tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

# cuDNN's fp8 kernels may rescale the running softmax lazily: with a threshold t > 0 the unnormalised probabilities
# reach e**t before they are scaled into fp8 and a scale_s of 448 would overflow. cudnn-frontend's own tests
# (test/python/test_mhas_v2.py) run Hopper with CUDNN_RESCALE_THRESHOLD=0, where probabilities stay in [0, 1].
os.environ.setdefault("CUDNN_RESCALE_THRESHOLD", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qsched_search.results.io import write_text  # noqa: E402  (atomic, as every results file of the project)

import torch
import torch.nn.functional as F

logger = logging.getLogger("bench_attention")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
COLUMNS = ["candidate", "tokens", "ms_per_call", "rel_err_vs_sdpa_bf16", "quant_ms", "notes", "rel_err_vs_fp32"]


# ================================================================================================ bookkeeping


class Results:
    """attention.csv and summary.json, rewritten after every row so that a killed run keeps what it measured."""

    def __init__(self, folder: Path, summary: dict):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.summary = summary

    def add(self, row: dict) -> None:
        self.rows.append(row)
        ms = row.get("ms_per_call")
        logger.info("%-28s tokens=%-5s ms=%-8s err_bf16=%-9s err_fp32=%-9s quant_ms=%-7s %s", row["candidate"],
                    row["tokens"], _fmt(ms), _fmt(row.get("rel_err_vs_sdpa_bf16")), _fmt(row.get("rel_err_vs_fp32")),
                    _fmt(row.get("quant_ms")), row.get("notes", ""))
        self.save()

    def save(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k, "") if k == "notes" else _fmt(row.get(k)) for k in COLUMNS})
        write_text(self.folder / "attention.csv", buf.getvalue())
        write_text(self.folder / "summary.json", json.dumps(self.summary, indent=2, default=str))


def _fmt(x) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class Budget:
    """Seconds left before the caller's time limit; candidates that would start too late are skipped, not killed."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ================================================================================================ measuring


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int, repeats: int, inner: int) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back calls of `fn`, in ms; `warmup` calls first.

    Back-to-back calls keep the GPU busy as long as the host launches faster than the kernel runs, so the mean is
    the kernel's time, not the launch's; the median discards the repeats disturbed by something else.
    """
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync(device)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None or out is None:
        return None
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def nan_note(out: torch.Tensor) -> str:
    bad = (~torch.isfinite(out.float())).sum().item()
    return f"; {bad} non-finite outputs" if bad else ""


# ================================================================================================ quantization


def quant_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in float8_e4m3fn with one scale, and its descale factor amax/448 (a 1-element float32 tensor)."""
    descale = (x.abs().amax().float() / FP8_MAX).clamp_min(1e-12).reshape(1)
    return (x.float() / descale).to(FP8), descale


def quant_per_head(x_bshd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (batch, tokens, heads, dim) in float8_e4m3fn with one scale per (batch, head); descales as (batch, heads)."""
    descale = (x_bshd.abs().amax(dim=(1, 3)).float() / FP8_MAX).clamp_min(1e-12)
    return (x_bshd.float() / descale[:, None, :, None]).to(FP8), descale.contiguous()


def dequant(xq: torch.Tensor, descale: torch.Tensor, per_head: bool) -> torch.Tensor:
    d = descale[:, None, :, None] if per_head else descale
    return xq.float() * d


# ================================================================================================ cuDNN fp8


class CudnnFp8Sdpa:
    """One cuDNN fp8 SDPA forward graph built with nvidia-cudnn-frontend's Python API, for fixed shapes.

    The graph follows cudnn-frontend's test/python/sdpa/fp8.py (generate_graph_fwd, exec_sdpa_fp8): q, k, v in
    float8_e4m3fn with descale factors, softmax probabilities scaled by scale_s into fp8 (descale_s = 1/scale_s), the
    output scaled by scale_o, and amax of S and O as outputs. The frontend refuses bf16/fp16 outputs of fp8 SDPA
    before Blackwell (include/cudnn_frontend/node/sdpa_support_surface.h), so on Hopper O is fp8 too: since
    O = softmax(S) V is a convex combination of rows of V, |O| <= amax(V), and scale_o = headroom * 448 / amax(V)
    cannot overflow.
    """

    # uids as in cudnn-frontend's test/python/sdpa/fp8.py (GraphFwdUid)
    Q, K, V, OUT, STATS = 0, 1, 2, 3, 4
    Q_DESCALE, K_DESCALE, V_DESCALE, S_DESCALE, S_SCALE, O_SCALE, S_AMAX, O_AMAX = 5, 6, 7, 8, 9, 10, 11, 12

    def __init__(self, cudnn, handle, b: int, h: int, s: int, d: int, per_head: bool, out_dtype: torch.dtype,
                 s_scale: float):
        self.cudnn, self.handle, self.per_head, self.out_dtype = cudnn, handle, per_head, out_dtype
        self.shape_bshd = (b, s, h, d)
        started = time.perf_counter()
        try:
            self.graph, self.with_stats = self._build(b, h, s, d, generate_stats=False), False
        except Exception as first:  # some engines only exist with stats (training); retry with them before giving up
            try:
                self.graph, self.with_stats = self._build(b, h, s, d, generate_stats=True), True
            except Exception:
                raise first from None
        self.build_s = time.perf_counter() - started
        self.workspace = torch.empty(self.graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
        self.o = torch.empty(self.shape_bshd, dtype=out_dtype, device="cuda")
        self.stats = torch.empty((b, h, s, 1), dtype=torch.float32, device="cuda") if self.with_stats else None
        self.s_scale = torch.full((1,), s_scale, dtype=torch.float32, device="cuda")
        self.s_descale = torch.full((1,), 1.0 / s_scale, dtype=torch.float32, device="cuda")
        self.s_amax = torch.zeros(1, dtype=torch.float32, device="cuda")
        self.o_amax = torch.zeros(1, dtype=torch.float32, device="cuda")
        try:
            self.plan = self.graph.get_plan_name_at_index(0)
        except Exception:  # older frontends lack it; the name is only informative
            self.plan = "?"

    def _build(self, b, h, s, d, generate_stats: bool):
        cudnn = self.cudnn
        dt = cudnn.data_type
        io_type = dt.FP8_E4M3
        out_type = {FP8: dt.FP8_E4M3, torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF}[self.out_dtype]
        g = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          handle=self.handle)
        # (b, h, s, d) dims over (b, s, h, d) memory, as the frontend's tests lay them out ("BSHD stride order")
        stride = (s * h * d, d, h * d, 1)
        q = g.tensor(uid=self.Q, dim=(b, h, s, d), stride=stride, data_type=io_type)
        k = g.tensor(uid=self.K, dim=(b, h, s, d), stride=stride, data_type=io_type)
        v = g.tensor(uid=self.V, dim=(b, h, s, d), stride=stride, data_type=io_type)
        one = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)
        qkv_scale = dict(dim=(b, h, 1, 1), stride=(h, 1, 1, 1), data_type=dt.FLOAT) if self.per_head else one
        q_descale = g.tensor(uid=self.Q_DESCALE, **qkv_scale)
        k_descale = g.tensor(uid=self.K_DESCALE, **qkv_scale)
        v_descale = g.tensor(uid=self.V_DESCALE, **qkv_scale)
        s_scale = g.tensor(uid=self.S_SCALE, **one)
        s_descale = g.tensor(uid=self.S_DESCALE, **one)
        o_scale = g.tensor(uid=self.O_SCALE, **one)
        o, stats, amax_s, amax_o = g.sdpa_fp8(
            q=q, k=k, v=v, descale_q=q_descale, descale_k=k_descale, descale_v=v_descale,
            descale_s=s_descale, scale_s=s_scale, scale_o=o_scale,
            generate_stats=generate_stats, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
        o.set_uid(self.OUT).set_output(True).set_dim((b, h, s, d)).set_stride(stride).set_data_type(out_type)
        if generate_stats:
            stats.set_uid(self.STATS).set_output(True).set_dim((b, h, s, 1)).set_stride((s * h, s, 1, 1)) \
                .set_data_type(dt.FLOAT)
        for amax, uid in ((amax_s, self.S_AMAX), (amax_o, self.O_AMAX)):
            amax.set_uid(uid).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return g

    def __call__(self, qf8, kf8, vf8, q_descale, k_descale, v_descale, o_scale) -> torch.Tensor:
        """Runs the graph on (b, s, h, d) fp8 tensors; returns O, (b, s, h, d), in the graph's output dtype."""
        pack = {self.Q: qf8, self.K: kf8, self.V: vf8, self.OUT: self.o,
                self.Q_DESCALE: q_descale, self.K_DESCALE: k_descale, self.V_DESCALE: v_descale,
                self.S_SCALE: self.s_scale, self.S_DESCALE: self.s_descale, self.O_SCALE: o_scale,
                self.S_AMAX: self.s_amax, self.O_AMAX: self.o_amax}
        if self.with_stats:
            pack[self.STATS] = self.stats
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return self.o


_CUDNN: dict = {}


def import_cudnn():
    """The cudnn frontend module and one handle on torch's current stream, after torch has loaded its libcudnn.

    The frontend dlopens libcudnn.so.9 from site-packages' nvidia/cudnn or, failing that, by name; loading torch's
    cuDNN first (torch.backends.cudnn.version()) makes the by-name fallback find the very same library. The handle
    runs on torch's stream so that CUDA events recorded there time the cuDNN kernels.
    """
    if not _CUDNN:
        torch.backends.cudnn.version()
        import cudnn

        handle = cudnn.create_handle()
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        _CUDNN.update(module=cudnn, handle=handle)
    return _CUDNN["module"], _CUDNN["handle"]


# ================================================================================================ candidates


class Case:
    """One shape's inputs, references and results so far."""

    def __init__(self, device: str, b: int, h: int, s: int, d: int, seed: int, head_spread: float = 0.0):
        self.device, self.b, self.h, self.s, self.d = device, b, h, s, d
        g = torch.Generator(device).manual_seed(seed)
        head_scale = 2.0 ** (head_spread * torch.linspace(-1, 1, h, device=device))[None, None, :, None]
        # (b, s, h, d) storage as diffusers' FluxAttnProcessor projects it; kernels get (b, h, s, d) views
        self.q_bshd, self.k_bshd, self.v_bshd = (
            (torch.randn(b, s, h, d, device=device, generator=g) * head_scale).to(torch.bfloat16) for _ in range(3))
        self.q, self.k, self.v = (x.transpose(1, 2) for x in (self.q_bshd, self.k_bshd, self.v_bshd))
        self.ref_fp32: torch.Tensor | None = None
        self.ref_bf16: torch.Tensor | None = None


def sdpa_ref_fp32(q, k, v) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def run_sdpa(case: Case, args, backend: str | None) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = case.q, case.k, case.v
    fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    if backend is None:
        out = fn()
        ms = time_ms(fn, case.device, args.warmup, args.repeats, args.inner)
        return dict(out=out, ms_per_call=ms)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        out = fn()
        ms = time_ms(fn, case.device, args.warmup, args.repeats, args.inner)
    return dict(out=out, ms_per_call=ms)


_FLEX = {}


def run_flex(case: Case, args) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    q, k, v = case.q, case.k, case.v
    started = time.perf_counter()
    with torch.no_grad():
        out = flex(q, k, v)
    sync(case.device)
    compile_s = time.perf_counter() - started
    ms = time_ms(lambda: flex(q, k, v), case.device, args.warmup, args.repeats, args.inner)
    return dict(out=out, ms_per_call=ms, notes=f"first call (compile) {compile_s:.1f} s")


def run_sim(case: Case, per_head: bool) -> dict:
    """fp32 SDPA of fp8-rounded q, k, v: the error that the input rounding alone causes (no P or O rounding)."""
    if per_head:
        deq = [dequant(*quant_per_head(x), per_head=True) for x in (case.q_bshd, case.k_bshd, case.v_bshd)]
    else:
        deq = [dequant(*quant_per_tensor(x), per_head=False) for x in (case.q_bshd, case.k_bshd, case.v_bshd)]
    q, k, v = (x.transpose(1, 2) for x in deq)
    out = sdpa_ref_fp32(q, k, v)
    return dict(out=out, notes="simulation, no kernel: fp32 SDPA on fp8-rounded q/k/v (no P or O rounding)")


def run_cudnn(case: Case, args, per_head: bool, out_dtype: torch.dtype, e2e_rows: bool, results: Results,
              name: str) -> dict:
    """cuDNN fp8 SDPA; adds the end-to-end row itself when `e2e_rows` (quantize, attend, dequantize, timed as one)."""
    if case.device != "cuda":
        return dict(notes="needs CUDA (skipped in --dry-run)")
    cudnn, handle = import_cudnn()
    b, h, s, d = case.b, case.h, case.s, case.d
    try:
        attn = CudnnFp8Sdpa(cudnn, handle, b, h, s, d, per_head, out_dtype, args.s_scale)
    except Exception as exc:  # the answer for (d) and the bf16-output probe: say what cuDNN refused, and why
        if per_head:
            what = "per-(batch, head) descale tensors"
        elif out_dtype != FP8:
            what = f"fp8 SDPA with {out_dtype} output"
        else:
            what = "fp8 SDPA graph"
        return dict(notes=f"not supported: cuDNN {cudnn.backend_version()} with frontend {cudnn.__version__} refused "
                          f"the {what} ({_one_line(exc)})")
    qkv = (case.q_bshd, case.k_bshd, case.v_bshd)
    quant = quant_per_head if per_head else quant_per_tensor

    def quantize():
        (qf, dq), (kf, dk), (vf, dv) = (quant(x) for x in qkv)
        # |O| <= amax(V) (rows of softmax(S) sum to 1): scale_o = headroom * 448 / amax(V) keeps O inside fp8's range
        o_scale = (args.o_headroom / dv.max()).reshape(1)
        return qf, kf, vf, dq, dk, dv, o_scale

    def dequantize(o, o_scale):
        if o.dtype != FP8:
            return o
        return (o.float() / o_scale).to(torch.bfloat16)

    with torch.no_grad():
        inputs = quantize()
        o = attn(*inputs)
        out = dequantize(o, inputs[-1]).transpose(1, 2)
        sync("cuda")
        ms = time_ms(lambda: attn(*inputs), "cuda", args.warmup, args.repeats, args.inner)
        quant_ms = time_ms(quantize, "cuda", args.warmup, args.repeats, args.inner)
        o_scale = inputs[-1]
        dequant_ms = time_ms(lambda: dequantize(attn.o, o_scale), "cuda", args.warmup, args.repeats, args.inner) \
            if out_dtype == FP8 else 0.0
    notes = (f"engine {attn.plan}; graph build {attn.build_s:.1f} s; stats {'on' if attn.with_stats else 'off'}; "
             f"scale_s {args.s_scale:g}; scale_o {args.o_headroom:g}*448/amax(V); "
             f"O dequant to bf16 {dequant_ms:.4f} ms; "
             f"amax_S {attn.s_amax.item():.4g}; amax_O {attn.o_amax.item():.4g}{nan_note(out)}")
    if not e2e_rows:
        return dict(out=out, ms_per_call=ms, quant_ms=quant_ms, notes=notes)

    row = dict(out=out, ms_per_call=ms, quant_ms=quant_ms, notes=notes)
    finish(results, case, name, row)

    def e2e():
        ins = quantize()
        return dequantize(attn(*ins), ins[-1])

    try:
        e2e_ms = time_ms(e2e, "cuda", args.warmup, args.repeats, args.inner)
    except Exception as exc:  # the kernel-only row is written already; this row says what went wrong
        return dict(candidate=f"{name}_e2e", notes=f"failed: {_one_line(exc)}")
    compiled_note = ""
    if args.compiled_quant:
        try:
            cq = torch.compile(quantize, dynamic=False)
            started = time.perf_counter()
            cq()
            sync("cuda")
            compile_s = time.perf_counter() - started
            cq_ms = time_ms(cq, "cuda", args.warmup, args.repeats, args.inner)
            compiled_note = f"; quantization under torch.compile {cq_ms:.4f} ms (compile {compile_s:.1f} s)"
        except Exception as exc:
            compiled_note = f"; compiled quantization failed ({_one_line(exc)})"
    return dict(out=out, ms_per_call=e2e_ms, quant_ms=quant_ms, candidate=f"{name}_e2e",
                notes=f"eager quantize q/k/v + attention + O dequant, timed as one call{compiled_note}")


def finish(results: Results, case: Case, name: str, row: dict) -> None:
    out = row.pop("out", None)
    row["candidate"] = row.get("candidate") or name
    row["tokens"] = case.s
    if out is not None:
        row["rel_err_vs_sdpa_bf16"] = rel_err(out, case.ref_bf16)
        row["rel_err_vs_fp32"] = rel_err(out, case.ref_fp32)
        if "non-finite" not in row.get("notes", ""):
            extra = nan_note(out)
            if extra:
                row["notes"] = (row.get("notes", "") + extra).lstrip("; ")
    results.add(row)


# ================================================================================================ main


def environment(args) -> dict:
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([sys.executable] + sys.argv),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn_backend_torch=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        capability=".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None,
        CUDNN_RESCALE_THRESHOLD=os.environ.get("CUDNN_RESCALE_THRESHOLD"),
        cudnn_fp8=dict(scale_s=args.s_scale, scale_o=f"{args.o_headroom:g} * 448 / amax(V)",
                       descale="amax / 448 per tensor (per (batch, head) in cudnn_fp8_per_head)",
                       output="float8_e4m3fn (Hopper), dequantized to bf16 for the error"),
        shape=dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, tokens=args.tokens),
        inputs="q, k, v ~ N(0, 1) bf16, stored (batch, tokens, heads, dim), passed as (batch, heads, tokens, dim) views"
               + (f"; head i scaled by 2**({args.head_spread:g} * u_i), u evenly spaced over [-1, 1]"
                  if args.head_spread else ""),
        references=dict(
            rel_err_vs_sdpa_bf16="||out - sdpa_bf16_default|| / ||sdpa_bf16_default||, in float32",
            rel_err_vs_fp32="||out - ref|| / ||ref||, ref = torch SDPA's math backend in float32 on the same bf16 "
                            "inputs"),
        timing=f"median over {args.repeats} repeats of the mean of {args.inner} back-to-back calls between CUDA "
               f"events (perf_counter on CPU), after {args.warmup} warm-up calls; quant_ms: eager quantization of q, "
               "k and v (amax/448 scales, float8_e4m3fn) plus the output scale",
        errors=[],
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        try:
            cudnn, _ = import_cudnn()
            env["cudnn_frontend"] = cudnn.__version__
            env["cudnn_backend_frontend"] = cudnn.backend_version()
        except Exception as exc:
            env["cudnn_frontend"] = f"not importable: {_one_line(exc)}"
    else:
        env["cudnn_frontend"] = "not loaded (needs CUDA)"
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for attention.csv and summary.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (2 heads of 64, 80 and 96 tokens)")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="sequence lengths, defaults to `4352,4608` (`80,96` with --dry-run)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="defaults to 24 (2 with --dry-run)")
    p.add_argument("--head-dim", type=int, default=None, help="defaults to 128 (64 with --dry-run)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed repeat")
    p.add_argument("--s-scale", type=float, default=FP8_MAX,
                   help="cuDNN scale_s for the softmax probabilities (in [0, 1] with CUDNN_RESCALE_THRESHOLD=0)")
    p.add_argument("--o-headroom", type=float, default=0.875,
                   help="cuDNN scale_o = this * 448 / amax(V); below 1 leaves room for the fp8 rounding of P")
    p.add_argument("--head-spread", type=float, default=0.0,
                   help="scale head i of q, k, v by 2**(spread * u_i), u spaced evenly over [-1, 1]: heads of unequal "
                        "range, where per-head scales pay off (0, the default: every head N(0, 1))")
    p.add_argument("--no-compiled-quant", dest="compiled_quant", action="store_false",
                   help="skip timing the q/k/v quantization under torch.compile")
    p.add_argument("--skip", default="", help="comma-separated candidate names to leave out")
    p.add_argument("--time-budget-s", type=float, default=1e9,
                   help="skip candidates once less than --reserve-s of this is left")
    p.add_argument("--reserve-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dry = args.dry_run
    args.tokens = args.tokens or ([80, 96] if dry else [4352, 4608])
    args.heads = args.heads or (2 if dry else 24)
    args.head_dim = args.head_dim or (64 if dry else 128)
    if dry:
        args.warmup, args.repeats, args.inner = min(args.warmup, 1), min(args.repeats, 3), min(args.inner, 2)
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 1
    torch.set_float32_matmul_precision("highest")  # the fp32 reference must not run in TF32
    budget = Budget(args.time_budget_s)
    results = Results(args.out, environment(args))
    skip = {s for s in args.skip.split(",") if s}
    logger.info("device %s; torch %s; cuDNN (torch) %s; frontend %s", results.summary["device"], torch.__version__,
                results.summary["cudnn_backend_torch"], results.summary.get("cudnn_frontend"))

    candidates = [  # most wanted first: a run cut short by its time limit loses the least
        ("sdpa_bf16_default", lambda c: run_sdpa(c, args, None)),
        ("cudnn_fp8_per_tensor", lambda c: run_cudnn(c, args, False, FP8, True, results, "cudnn_fp8_per_tensor")),
        ("cudnn_fp8_per_head", lambda c: run_cudnn(c, args, True, FP8, False, results, "cudnn_fp8_per_head")),
        ("sdpa_bf16_cudnn", lambda c: run_sdpa(c, args, "CUDNN_ATTENTION")),
        ("sdpa_bf16_flash", lambda c: run_sdpa(c, args, "FLASH_ATTENTION")),
        ("sdpa_bf16_efficient", lambda c: run_sdpa(c, args, "EFFICIENT_ATTENTION")),
        ("sim_fp8_qkv_per_tensor", lambda c: run_sim(c, per_head=False)),
        ("sim_fp8_qkv_per_head", lambda c: run_sim(c, per_head=True)),
        ("cudnn_fp8_bf16_out",
         lambda c: run_cudnn(c, args, False, torch.bfloat16, False, results, "cudnn_fp8_bf16_out")),
        ("flex_bf16_compiled", lambda c: run_flex(c, args)),
    ]
    for s in args.tokens:
        logger.info("--- %d tokens (batch %d, %d heads, dim %d)", s, args.batch, args.heads, args.head_dim)
        try:
            case = Case(device, args.batch, args.heads, s, args.head_dim, args.seed, args.head_spread)
            case.ref_fp32 = sdpa_ref_fp32(case.q, case.k, case.v)
            with torch.no_grad():
                case.ref_bf16 = F.scaled_dot_product_attention(case.q, case.k, case.v)
            sync(device)
        except Exception as exc:
            results.summary["errors"].append(dict(tokens=s, stage="inputs/references", error=_one_line(exc),
                                                  traceback=traceback.format_exc()))
            results.save()
            logger.error("tokens %d: %s", s, _one_line(exc))
            continue
        for name, run in candidates:
            if name in skip:
                continue
            if budget.left() < args.reserve_s:
                finish(results, case, name, dict(notes="skipped: time budget spent"))
                continue
            try:
                row = run(case)
            except Exception as exc:  # one candidate's failure must not cost the others their rows
                results.summary["errors"].append(dict(tokens=s, candidate=name, error=_one_line(exc),
                                                      traceback=traceback.format_exc()))
                row = dict(notes=f"failed: {_one_line(exc)}")
            finish(results, case, name, row)
            if device == "cuda":
                torch.cuda.empty_cache()
        del case
    results.summary["finished"] = True
    results.save()
    logger.info("wrote %s", args.out / "attention.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
