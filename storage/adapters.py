"""PEFT LoRA adapters: config, tensor-name conventions, and factors with PEFT's exact scale.

A LoRA child changes a base weight W by `delta = B @ A * scale` (transposed when the base stores
`in x out`). We keep the factors, not the product: they are r*(in+out) numbers, not in*out.
`scale` must be what PEFT applies at merge time, so it is computed by the same rules as
peft 0.21 (`LoraModel._create_and_replace` + `LoraLayer.update_layer`):
  r     = rank_pattern[get_pattern_key(rank_pattern, module)]   or config r
  alpha = alpha_pattern[get_pattern_key(alpha_pattern, module)] or config lora_alpha
  scale = alpha / sqrt(r) with use_rslora, else alpha / r
where `module` is the module path inside the base model (`encoder.layer.4.attention.self.query`).

Layer names (stable keys for Parquet partitions and expert configs):
  LoRA tensors -> their module path without `base_model.model.`;
  any other tensor -> its tensor name (`_blocks.15._project_conv.weight`), also stripped of
  `base_model.model.` (a head saved inside an adapter file).
`LoraFactors.base_tensor` gives the base-model tensor a LoRA module modifies (`<module>.weight`),
to line LoRA children up with their root's full weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from storage.safetensors_reader import (
    ByteSource,
    SafetensorsHeader,
    TensorReadError,
    as_matrix,
    read_header,
    read_tensors,
)

PEFT_PREFIX = "base_model.model."
# `<module>.lora_A.weight` or `<module>.lora_A.<adapter>.weight`; embeddings store bare parameters:
# `<module>.lora_embedding_A[.<adapter>]`. `lora_B.bias` (lora_bias=True) deliberately does not match.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<kind>lora_[AB])(?:\.[^.]+)?\.weight|(?P<ekind>lora_embedding_[AB])(?:\.[^.]+)?)$"
)


def _kind(m: re.Match) -> tuple[str, bool]:
    """("A" or "B", is_embedding) of a matched key."""
    return (m["kind"] or m["ekind"])[-1], m["ekind"] is not None


class AdapterError(TensorReadError):
    """An adapter we cannot turn into faithful factors: quarantine the model with `reason`.

    Reasons: bad_adapter_config, not_lora, dora_unsupported, missing_factor, rank_mismatch.
    """


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The pattern that governs `key_to_match` under PEFT's rule: the first pattern (in file order)
    that, read as a regular expression, matches the whole module path or its last dot-separated
    components; the module path itself when no pattern does."""
    for pattern in pattern_keys:
        tail = re.compile(f"(?:{pattern})")
        parts = key_to_match.split(".")
        # Try every suffix "a.b.c", "b.c", "c" against the full pattern.
        if any(tail.fullmatch(".".join(parts[i:])) for i in range(len(parts))):
            return pattern
    return key_to_match


@dataclass(frozen=True)
class LoraAdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    base_model: str | None = None  # base_model_name_or_path, as PEFT recorded it

    def rank_for(self, module: str) -> int:
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern, module), self.r)

    def alpha_for(self, module: str) -> float:
        return self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, module), self.lora_alpha)

    def scale_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def parse_adapter_config(doc: dict | str | bytes) -> LoraAdapterConfig:
    """`adapter_config.json` (dict, JSON text or bytes) -> LoraAdapterConfig, with PEFT's defaults."""
    if isinstance(doc, (str, bytes)):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as err:
            raise AdapterError("bad_adapter_config", f"adapter_config.json is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise AdapterError("bad_adapter_config", "adapter_config.json is not a JSON object")
    if doc.get("peft_type", "LORA") != "LORA":
        raise AdapterError("not_lora", f"adapter is {doc['peft_type']}, only LoRA is read")
    try:
        cfg = LoraAdapterConfig(
            r=int(doc.get("r", 8)),
            lora_alpha=doc.get("lora_alpha", 8),
            use_rslora=bool(doc.get("use_rslora", False)),
            rank_pattern=dict(doc.get("rank_pattern") or {}),
            alpha_pattern=dict(doc.get("alpha_pattern") or {}),
            target_modules=doc.get("target_modules"),
            fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
            use_dora=bool(doc.get("use_dora", False)),
            base_model=doc.get("base_model_name_or_path"),
        )
    except (TypeError, ValueError) as err:
        raise AdapterError("bad_adapter_config", f"adapter_config.json has a bad field ({err})") from None
    ranks = [cfg.r, *cfg.rank_pattern.values()]
    if not all(isinstance(v, int) and v > 0 for v in ranks):
        raise AdapterError("bad_adapter_config", f"ranks must be positive integers, got {ranks}")
    return cfg


def strip_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def parse_lora_key(tensor_name: str) -> tuple[str, str] | None:
    """`base_model.model.x.q.lora_A.default.weight` -> ("x.q", "A"); None for non-LoRA tensors."""
    m = _LORA_KEY.match(tensor_name)
    if not m:
        return None
    return strip_prefix(m["module"]), _kind(m)[0]


def layer_name(tensor_name: str) -> str:
    """The stable layer name of a tensor (see the module docstring)."""
    parsed = parse_lora_key(tensor_name)
    return parsed[0] if parsed else strip_prefix(tensor_name)


@dataclass(frozen=True)
class LoraPair:
    module: str
    a_name: str
    b_name: str
    embedding: bool  # lora_embedding_*: stored as parameters, delta is transposed


def lora_modules(tensor_names: Iterable[str]) -> dict[str, LoraPair]:
    """Group an adapter file's tensor names into {module: LoraPair}. A module with only one of
    A/B means a broken adapter: AdapterError('missing_factor')."""
    found: dict[str, dict[str, str]] = {}
    embedding: set[str] = set()
    for name in tensor_names:
        m = _LORA_KEY.match(name)
        if not m:
            continue  # heads (modules_to_save), lora_B biases, DoRA magnitudes: not factors
        module = strip_prefix(m["module"])
        part, is_embedding = _kind(m)
        found.setdefault(module, {})[part] = name
        if is_embedding:
            embedding.add(module)
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise AdapterError("missing_factor", f"module {module!r} has lora_{next(iter(parts))} but not its partner")
        pairs[module] = LoraPair(module, parts["A"], parts["B"], module in embedding)
    return pairs


@dataclass
class LoraFactors:
    """One module's LoRA: `A` (r x in), `B` (out x r), as matrices (conv kernels flattened the
    same way `as_matrix` flattens the base kernel), and PEFT's `scale`.

    `transposed` is True when the base weight is stored `in x out` (fan_in_fan_out, e.g. GPT-2
    Conv1D, or embeddings): then the delta to that weight is `(B @ A).T * scale`.
    """

    module: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    transposed: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def base_tensor(self) -> str:
        return f"{self.module}.weight"

    def delta(self) -> np.ndarray:
        """The change to the base weight as a matrix, laid out like `as_matrix(base weight)`."""
        d = (self.B.astype(np.float64) @ self.A.astype(np.float64)) * self.scale
        return (d.T if self.transposed else d).astype(np.float32)


def make_factors(config: LoraAdapterConfig, pair: LoraPair, a: np.ndarray, b: np.ndarray) -> LoraFactors:
    """Validate and flatten one module's raw tensors into LoraFactors."""
    if config.use_dora:
        raise AdapterError("dora_unsupported", "DoRA rescales the merged weight; B @ A * scale is not its delta")
    A, B = as_matrix(a), as_matrix(b)
    r = config.rank_for(pair.module)
    if A.shape[0] != r or B.shape[1] != r:
        raise AdapterError(
            "rank_mismatch",
            f"module {pair.module!r}: A {a.shape} and B {b.shape} do not have the rank {r} that adapter_config.json gives it",
        )
    return LoraFactors(pair.module, A, B, config.scale_for(pair.module), config.fan_in_fan_out or pair.embedding)


def read_lora_factors(
    src: ByteSource,
    config: LoraAdapterConfig,
    modules: Iterable[str] | None = None,
    header: SafetensorsHeader | None = None,
    out_dtype=np.float32,
) -> dict[str, LoraFactors]:
    """Read the factors of `modules` (all LoRA modules when None) from `adapter_model.safetensors`,
    fetching only their bytes."""
    header = header or read_header(src)
    pairs = lora_modules(header.tensors)
    wanted = list(pairs) if modules is None else list(modules)
    unknown = [m for m in wanted if m not in pairs]
    if unknown:
        raise AdapterError("missing_factor", f"{src.name} has no LoRA factors for module {unknown[0]!r}")
    names = [n for m in wanted for n in (pairs[m].a_name, pairs[m].b_name)]
    arrays = read_tensors(src, names, header, out_dtype)
    return {m: make_factors(config, pairs[m], arrays[pairs[m].a_name], arrays[pairs[m].b_name]) for m in wanted}
