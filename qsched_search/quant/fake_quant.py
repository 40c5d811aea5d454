"""Fake quantization: the rounding each level does to weights and activations, in plain PyTorch, on any device.

Two recipes. `generic` is the classic per-channel / per-token symmetric rounding (`torch.fake_quantize_*`).
`torchao` follows torchao 0.18's own formulas step by step (scale dtypes, rounding ranges, where the result is cast
to the model's dtype), so that a simulated level computes what its kernel computes; `tests/test_fidelity.py`
compares the two with torchao itself.
"""

from __future__ import annotations

from typing import Callable

import torch

from qsched_search.quant.levels import Level

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}



def _int_range(bits: int) -> tuple[int, int]:
    # Symmetric, narrow range (-q..q) so that zero is exact and the scale is max|x| / q.
    q = 2 ** (bits - 1) - 1
    return -q, q


def _scales(amax: torch.Tensor, bound: float) -> torch.Tensor:
    return (amax.float() / bound).clamp(min=1e-12)


def fake_quant_int(x: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Symmetric integer fake quantization with one scale per slice along `axis` (or one per tensor)."""
    qmin, qmax = _int_range(bits)
    xf = x.float()
    if axis is None:
        scale = _scales(xf.abs().amax(), qmax)
        out = torch.fake_quantize_per_tensor_affine(xf, scale, torch.zeros((), dtype=torch.int32), qmin, qmax)
    else:
        dims = [d for d in range(xf.dim()) if d != axis % xf.dim()]
        scale = _scales(xf.abs().amax(dim=dims), qmax)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        out = torch.fake_quantize_per_channel_affine(xf, scale, zero, axis % xf.dim(), qmin, qmax)
    return out.to(x.dtype)


def fake_quant_float(x: torch.Tensor, dtype: torch.dtype, axis: int | None) -> torch.Tensor:
    """Scaled float8 fake quantization: scale into the format's range, round through the dtype, scale back."""
    xf = x.float()
    bound = torch.finfo(dtype).max
    if axis is None:
        scale = _scales(xf.abs().amax(), bound)
    else:
        dims = [d for d in range(xf.dim()) if d != axis % xf.dim()]
        shape = [1] * xf.dim()
        shape[axis % xf.dim()] = -1
        scale = _scales(xf.abs().amax(dim=dims), bound).view(shape)
    return ((xf / scale).to(dtype).float() * scale).to(x.dtype)


def quantize_weight(weight: torch.Tensor, level: Level) -> torch.Tensor:
    """The weight as the level sees it, rounded once (output channels are dim 0 for Linear and Conv2d)."""
    if level.is_reference:
        return weight
    if level.format == "cast":
        return weight.to(DTYPES[level.dtype]).to(weight.dtype)
    if level.weight_granularity == "per_group":
        # One scale per `group_size` consecutive input features of an output channel (flattened for convolutions).
        flat = weight.reshape(weight.shape[0], -1)
        if flat.shape[1] % level.group_size:
            return fake_quant_int(weight, level.weight_bits, 0)  # too few inputs for whole groups: per channel
        groups = flat.reshape(-1, level.group_size)
        return fake_quant_int(groups, level.weight_bits, 0).reshape(weight.shape)
    axis = 0 if level.weight_granularity == "per_channel" else None
    if level.format == "float8":
        return fake_quant_float(weight, DTYPES[level.dtype], axis)
    return fake_quant_int(weight, level.weight_bits, axis)


def activation_quantizer(level: Level) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function that rounds a layer's input on every call, or None when the level leaves activations alone."""
    if level.format == "cast":
        dtype = DTYPES[level.dtype]
        return lambda x: x.to(dtype).to(x.dtype)
    if not level.quantizes_activations:
        return None
    per_token = level.act_granularity == "per_token"

    def rounding(x2d: torch.Tensor, axis: int | None) -> torch.Tensor:
        if level.format == "float8":
            return fake_quant_float(x2d, DTYPES[level.dtype], axis)
        return fake_quant_int(x2d, level.act_bits, axis)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if not per_token:
            return rounding(x, None)
        if x.dim() == 4:
            # Conv2d input (B, C, H, W): a "token" is one pixel's channel vector.
            b, c, h, w = x.shape
            flat = x.permute(0, 2, 3, 1).reshape(-1, c)
            return rounding(flat, 0).reshape(b, h, w, c).permute(0, 3, 1, 2)
        shape = x.shape
        return rounding(x.reshape(-1, shape[-1]), 0).reshape(shape)

    return quantize


# ----------------------------------------------------------------------------------------------- torchao's recipes
# Each mirrors torchao 0.18 (torchao/quantization/quant_primitives.py and the Float8Tensor, Int8Tensor and
# Int4TilePackedTo4dTensor linear implementations) operation by operation, in the same dtypes: the scale of an int8
# or float8 level is computed in the model's dtype before it becomes float32, int4 groups round in the model's dtype.


def torchao_int8_symmetric(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's symmetric int8 (choose_qparams_affine + quantize_affine, range -128..127): integer-valued float32
    values and float32 scales (one per row of the last dimension, or one)."""
    dims = (-1,) if per_row else tuple(range(x.dim()))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    amax = torch.maximum(-torch.minimum(x.amin(dim=dims, keepdim=True), zero), torch.maximum(x.amax(dim=dims, keepdim=True), zero))
    scale = torch.clamp(amax / 127.5, min=torch.finfo(torch.float32).eps).to(torch.float32)
    q = torch.clamp(torch.round(x * (1.0 / scale)), -128, 127)
    return q, scale


def torchao_float8(x: torch.Tensor, dtype: torch.dtype, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's float8 (_choose_scale_float8 + _quantize_affine_float8): saturated float8 values and float32 scales."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = (amax / fmax).to(torch.float32)
    q = (x.to(torch.float32) / scale).clamp(min=-fmax, max=fmax).to(dtype)
    return q, scale


def torchao_int4_tinygemm(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """torchao's tinygemm int4 weight (asymmetric, 0..15, scale and float zero point per group, in the weight's
    dtype), returned dequantized as the kernel uses it."""
    out_f, in_f = weight.shape
    w = weight.reshape(out_f, in_f // group_size, group_size)
    min_val, max_val = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = torch.clamp((max_val - min_val) / 15.0, min=torch.finfo(weight.dtype).smallest_normal)
    zero = min_val + scale * 8.0
    q = torch.clamp(torch.round((w - (zero - scale * 8.0)) / scale), 0, 15)
    dequant = (q - 8.0).to(weight.dtype) * scale + zero
    return dequant.reshape(out_f, in_f)


class LinearRecipe:
    """A Linear layer at one level: the weight prepared once, the forward computing what the kernel computes."""

    def __init__(self, recipe: str, level: Level, weight: torch.Tensor):
        self.recipe = recipe
        w = weight.detach()
        per_row = level.weight_granularity != "per_tensor"
        # Quantized values are held in their own dtypes (float8, int8) and widened at each call: a bank of several
        # levels of a large model then costs about what the real kernels' weights cost.
        if recipe == "fp8":
            self.dtype = DTYPES[level.dtype]
            self.per_row = per_row
            self.q, self.scale = torchao_float8(w, self.dtype, per_row)
        elif recipe in ("int8-dynamic", "int8-weight"):
            self.per_row_act = level.act_granularity != "per_tensor"
            q, self.scale = torchao_int8_symmetric(w, per_row)
            self.q = q.to(torch.int8)
        elif recipe == "int4-tinygemm":
            self.weight = torchao_int4_tinygemm(w, level.group_size)
        else:
            raise ValueError(f"unknown recipe {recipe!r}")

    def extra_bytes(self) -> int:
        tensors = [getattr(self, n) for n in ("weight", "q", "scale") if hasattr(self, n)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out_dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.recipe == "fp8":
            xq, xs = torchao_float8(x2, self.dtype, self.per_row)
            w = self.q.to(torch.float32) * self.scale
            y = (xq.to(torch.float32) * xs) @ w.t()  # _scaled_mm: float32 accumulation, bias in the epilogue
            if bias is not None:
                y = y + bias.to(torch.float32)
            y = y.to(out_dtype)
        elif self.recipe == "int8-dynamic":
            xq, xs = torchao_int8_symmetric(x2, self.per_row_act)
            # int32 accumulation is exact; float64 holds it exactly, then int32 -> float32 as torch._int_mm's caller does
            acc = (xq.to(torch.float64) @ self.q.to(torch.float64).t()).to(torch.float32)
            y = (acc * xs.reshape(-1, 1)).to(out_dtype)
            y = y * self.scale.flatten()
            if bias is not None:
                y = y + bias
            y = y.to(out_dtype)
        elif self.recipe == "int8-weight":
            y = x2 @ self.q.to(out_dtype).t()
            y = y * self.scale.to(y.dtype).flatten()
            if bias is not None:
                y = y + bias
            y = y.to(out_dtype)
        else:  # int4-tinygemm: the dequantized weight in the model's dtype, the product accumulated in float32
            y = torch.nn.functional.linear(x2, self.weight, bias).to(out_dtype)
        return y.reshape(*shape[:-1], y.shape[-1])
