"""Quantized checkpoints: which scheme stores a layer, FP8 dequantized, integer packings refused.

A quantized copy keeps the root's layer under a different tensor layout. What the Hub ships:

* FP8 with scales, dequantized here to `W = q * s` (float32):
  - compressed-tensors (`quant_method: compressed-tensors`, float-quantized): `<module>.weight`
    F8_E4M3 (or I8 for int-quantized, with an optional `weight_zero_point`: `W = (q - z) * s`)
    and `<module>.weight_scale`, per tensor (shape `[]`/`[1]`), per channel (`[out, 1]`) or per
    group (`[out, in / group]`);
  - fine-grained FP8 (`quant_method: fp8`, DeepSeek / Qwen style): `<module>.weight` F8_E4M3 and
    `<module>.weight_scale_inv` of shape `[ceil(out / b0), ceil(in / b1)]`, the block size
    `[b0, b1]` from config.json `quantization_config.weight_block_size`. Despite its name the
    scale multiplies (transformers' `Fp8Dequantize`, DeepSeek's `weight_dequant`).
* Integer packings, refused with the method named, never read as if they were weights: GPTQ and
  AWQ (`qweight` / `qzeros` / `scales`), bitsandbytes NF4/FP4 (`weight.absmax`, `quant_map`,
  `quant_state.bitsandbytes__*`) and int8 (`SCB`), compressed-tensors pack-quantized
  (`weight_packed`), MXFP4 (`*_blocks` / `*_scales`).

Detection reads names only (the index or the header, already fetched); config.json is read only
when a layer has quantization companions, to name the method and find the FP8 block size.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from storage.safetensors_reader import FLOAT_DTYPES, UnsupportedTensorError

CONFIG_FILE = "config.json"


class QuantizedError(UnsupportedTensorError):
    """A layer stored in a quantization this reader does not undo. `reason` is `quantized_<method>`
    (e.g. `quantized_gptq`), or `bad_quantization` for scales that do not fit their weight."""


@dataclass(frozen=True)
class QuantConfig:
    """config.json `quantization_config`, the fields that decide how a layer is read."""

    method: str | None = None  # quant_method, lower case ("fp8", "gptq", ...); None: none declared
    block_size: tuple[int, int] | None = None  # fine-grained FP8 weight_block_size
    bits: int | None = None  # gptq / awq bits
    bnb_4bit_type: str | None = None  # bitsandbytes 4-bit: "nf4" | "fp4"


def parse_quant_config(raw: bytes | str | dict | None) -> QuantConfig:
    """The `quantization_config` of config.json (bytes, text or parsed); an absent or unreadable
    config declares nothing (layers are then told apart by their tensor names alone)."""
    try:
        doc = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except (UnicodeDecodeError, ValueError):
        return QuantConfig()
    q = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not isinstance(q, dict):
        return QuantConfig()
    block = q.get("weight_block_size")
    ok_block = isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    bits = q.get("bits") if isinstance(q.get("bits"), int) else None
    bnb = q.get("bnb_4bit_quant_type") if q.get("load_in_4bit") else None
    return QuantConfig(str(q.get("quant_method") or "").lower() or None, tuple(block) if ok_block else None,
                       bits, bnb)


@dataclass(frozen=True)
class LayerPlan:
    """How to obtain one layer: the stored tensor and, for FP8/int8 with scales, its companions."""

    layer: str
    weight: str
    scale: str | None = None
    zero_point: str | None = None
    block_size: tuple[int, int] | None = None  # weight_scale_inv blocks
    method: str | None = None  # "fp8" | "compressed-tensors" when dequantized

    @property
    def tensors(self) -> list[str]:
        return [n for n in (self.weight, self.scale, self.zero_point) if n]

    @property
    def dequantized(self) -> bool:
        return self.scale is not None


def _module(layer: str) -> str:
    return layer.removesuffix(".weight")


def _packing(layer: str, names: Collection[str]) -> str | None:
    """The integer packing a layer's companions show, as a method name; None when there is none."""
    module = _module(layer)
    if f"{module}.qweight" in names:
        return "gptq_or_awq"
    if any(n.startswith(f"{layer}.quant_state.bitsandbytes__") for n in names) or f"{layer}.absmax" in names:
        return "bitsandbytes_4bit"
    if f"{module}.SCB" in names:
        return "bitsandbytes_int8"
    if f"{module}.weight_packed" in names:
        return "compressed-tensors_packed"
    if f"{layer}_blocks" in names or f"{module}_blocks" in names:
        return "mxfp4"
    return None


def has_companions(layers: Collection[str], names: Collection[str]) -> bool:
    """Whether any layer is stored quantized (then config.json is worth reading)."""
    return any(_packing(l, names) or f"{_module(l)}.weight_scale" in names or f"{_module(l)}.weight_scale_inv" in names
               for l in layers)


# Per packing: the catalog reason, and what the format is and why its values are not read.
_REFUSALS = {
    "gptq": ("quantized_gptq", "GPTQ: 2/3/4/8-bit integers packed in int32 `qweight` with `qzeros`, `scales` "
             "and a group order (`g_idx`)"),
    "awq": ("quantized_awq", "AWQ: 4-bit integers packed in int32 `qweight` (AWQ's interleaved order) with "
            "`qzeros` and `scales`"),
    "gptq_or_awq": ("quantized_gptq_or_awq", "GPTQ or AWQ (config.json names neither): integers packed in "
                    "int32 `qweight` with `qzeros` and `scales`"),
    "bitsandbytes_4bit": ("quantized_bitsandbytes", "bitsandbytes 4-bit ({kind}): codes packed two per byte "
                          "with blockwise `absmax` and a `quant_map`"),
    "bitsandbytes_int8": ("quantized_bitsandbytes", "bitsandbytes int8 (LLM.int8): int8 rows with `SCB` row "
                          "statistics"),
    "compressed-tensors_packed": ("quantized_compressed_tensors", "compressed-tensors pack-quantized: low-bit "
                                  "integers packed in `weight_packed`"),
    "mxfp4": ("quantized_mxfp4", "MXFP4: FP4 blocks with shared E8M0 exponents (`*_blocks`, `*_scales`)"),
}


def _refuse(layer: str, packing: str, config: QuantConfig) -> QuantizedError:
    if packing == "gptq_or_awq" and config.method in ("gptq", "awq"):
        packing = config.method
    reason, what = _REFUSALS[packing]
    return QuantizedError(reason, f"{what.format(kind=(config.bnb_4bit_type or 'NF4/FP4').upper())}; layer "
                          f"{layer} is not dequantized by this reader and its integer tensors are not weights "
                          "(read the unquantized parent instead)")


def plan_layer(layer: str, names: Collection[str], config: QuantConfig) -> LayerPlan:
    """Which tensors give `layer`, or QuantizedError naming the method that stores it."""
    if packing := _packing(layer, names):
        raise _refuse(layer, packing, config)
    if layer not in names:
        return LayerPlan(layer, layer)  # the reader reports the missing tensor
    module = _module(layer)
    zero = f"{module}.weight_zero_point" if f"{module}.weight_zero_point" in names else None
    if f"{module}.weight_scale_inv" in names:
        if config.block_size is None:
            raise QuantizedError("bad_quantization", f"{module}.weight_scale_inv has block scales but config.json "
                                 "declares no quantization_config.weight_block_size: the blocks are unknown")
        return LayerPlan(layer, layer, f"{module}.weight_scale_inv", zero, config.block_size, "fp8")
    if f"{module}.weight_scale" in names:
        return LayerPlan(layer, layer, f"{module}.weight_scale", zero, config.block_size, config.method or "compressed-tensors")
    return LayerPlan(layer, layer)


def _expand(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int] | None, name: str) -> np.ndarray:
    """A scale broadcastable to an `out x in` weight: per tensor, per channel, per group or per block."""
    out, inn = shape
    s = scale.reshape(scale.shape[0], -1) if scale.ndim else scale.reshape(1, 1)
    if s.size == 1:
        return s.reshape(1, 1)
    if s.shape == (out, 1):
        return s
    if block is not None and s.shape == (-(-out // block[0]), -(-inn // block[1])):
        return np.repeat(np.repeat(s, block[0], axis=0)[:out], block[1], axis=1)[:, :inn]
    if s.shape[0] == out and inn % s.shape[1] == 0:  # groups along the input
        return np.repeat(s, inn // s.shape[1], axis=1)
    raise QuantizedError("bad_quantization", f"{name} has shape {list(scale.shape)}, which fits no per-tensor, "
                         f"per-channel, group or block layout of a {out}x{inn} weight")


def _as_scale(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    # MXFP8-style U8 scales are E8M0 exponents: 2 ** (byte - 127), as transformers reads them.
    if dtype == "U8":
        return np.ldexp(np.float32(1), arr.astype(np.int32) - 127).astype(np.float32)
    return arr.astype(np.float32)


def materialize(plan: LayerPlan, arrays: dict[str, np.ndarray], dtypes: dict[str, str | None]) -> np.ndarray:
    """The layer's values as stored (float) or dequantized (float32). An integer tensor with no
    scale is not a weight: QuantizedError."""
    q = arrays[plan.weight]
    dtype = dtypes.get(plan.weight)
    if not plan.dequantized:
        if dtype not in FLOAT_DTYPES:
            raise QuantizedError("not_float", f"layer {plan.layer} is stored as {dtype} with no scale: an integer "
                                 "tensor, not a float weight (a quantization this reader does not know?)")
        return q
    if q.ndim != 2:
        raise QuantizedError("bad_quantization", f"layer {plan.layer} is a {q.ndim}-D quantized tensor; only "
                             "2-D weights are dequantized")
    if dtype not in FLOAT_DTYPES and dtype not in ("I8", "U8"):
        raise QuantizedError("bad_quantization", f"layer {plan.layer} is {dtype} with a scale: not FP8 or int8")
    s = _expand(_as_scale(arrays[plan.scale], dtypes.get(plan.scale)), q.shape, plan.block_size, plan.scale)
    w = q.astype(np.float32)
    if plan.zero_point:
        w = w - _expand(arrays[plan.zero_point].astype(np.float32), q.shape, plan.block_size, plan.zero_point)
    return w * s
