"""LoRA adapters as the Hub ships them: PEFT, diffusers and kohya files, kept as factors with the
scale their own loader applies.

A LoRA child changes a base weight W by `delta = B @ A * scale` (transposed when the base stores
`in x out`). We keep the factors, not the product: they are r*(in+out) numbers, not in*out.

PEFT (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`): `scale` is what PEFT applies at merge time, by the rules
of peft 0.21 (`LoraModel._create_and_replace` + `LoraLayer.update_layer`):
  r     = rank_pattern[get_pattern_key(rank_pattern, module)]   or config r
  alpha = alpha_pattern[get_pattern_key(alpha_pattern, module)] or config lora_alpha
  scale = alpha / sqrt(r) with use_rslora, else alpha / r
where `module` is the module path inside the base model (`encoder.layer.4.attention.self.query`).
Configs whose merge is not `W + scale * B @ A` (DoRA and PEFT's other variants, initialisations
that rewrite the base weights) are refused with the variant named (`PEFT_VARIANTS` ...).

diffusers (`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight`, older
`.lora.down.weight` / `processor.to_q_lora.down.weight`; no adapter_config.json): the scale rules
of the LoraConfig diffusers stores in the file's metadata (`lora_adapter_metadata`, keys prefixed
by component when a pipeline saved it), else 1.0 (diffusers then sets lora_alpha = r).

kohya (`lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`): scale
alpha / rank (alpha absent or 0 means alpha = rank, as kohya's LoRAModule reads it); module names
are mapped to the root's by comparing them with the root's names, dots made underscores.

LyCORIS (LoHa `hada_w1_a`, LoKr `lokr_w1`, LoCon's Tucker `lora_mid`, OFT) is not a product of two
factors: refused with its kind named.

Module names (`LoraPair.module`, `LoraFactors.module`, the crawl's adapter signature): the module
path in the base model (without `base_model.model.`; a diffusers denoiser's `unet.` /
`transformer.` dropped, so they match the root's unet tensors; other components keep their prefix,
`text_encoder.`); kohya keys mapped to the root's modules.

Layer names (Parquet partitions, candidate layers, expert configs) are the ROOT's tensor names,
whatever the child's format, so one tree's full fine-tunes, adapters and dequantized copies share
them: a LoRA module changes `<module>.weight` (`LoraFactors.base_tensor`), matched to the root's
names by `module_layers` / `match_layers` (a leading prefix may differ: PEFT wraps the task model,
`bert.encoder...`, a root may be saved with `model.`). `layer_name` gives a tensor's own name.
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

    Reasons: bad_adapter_config, not_lora, <variant>_unsupported (dora_unsupported,
    pissa_unsupported, lycoris_loha_unsupported, ...), missing_factor, rank_mismatch, bad_alpha.
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


# --- which LoraConfig fields change the merge ---------------------------------------------------
# Every field of peft's LoraConfig is in exactly one of these (tests/test_adapters.py checks it
# against the installed peft, so a field a new release adds fails the test until it is placed).

# Scale and layout rules this module applies.
SCALE_FIELDS = frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"})
# Bookkeeping, training-only or selection fields: the saved factors still give the weight's delta.
# (lora_bias adds a bias to lora_B: it changes the merged bias, not the weight read here; bias and
# modules_to_save train other tensors, which the file stores whole.)
NEUTRAL_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "lora_dropout", "bias", "modules_to_save",
    "layers_to_transform", "layers_pattern", "megatron_config", "megatron_core", "eva_config",
    "qalora_group_size", "runtime_config", "lora_bias", "ensure_weight_tying",
    # these matter only through their init_lora_weights value, checked against INIT_VARIANTS
    "init_lora_weights", "loftq_config", "corda_config", "lora_ga_config",
})
# PEFT variants whose merge stays W + scale * B @ A (their merge_safe is vanilla LoRA's): VeLoRA
# changes only the backward pass, MiCA only the initialisation. The tests merge each with peft.
VANILLA_VARIANTS = frozenset({"velora_config", "mica"})
# Fields PEFT marks as variants (`is_lora_variant`: its merge is no longer W + scale * B @ A), and
# others whose saved factors are not the whole change: refused, named.
PEFT_VARIANTS = {
    "use_dora": ("dora", "DoRA rescales every column of W + scale * B @ A by a learned magnitude"),
    "alora_invocation_tokens": ("alora", "aLoRA applies its delta only after the invocation tokens: it does not merge"),
    "monteclora_config": ("monteclora", "MonteCLoRA samples its factors (a variational mixture)"),
    "use_bdlora": ("bdlora", "BD-LoRA stores block-diagonal factors"),
    "arrow_config": ("arrow", "Arrow routes among several adapters per token"),
    "kasa_config": ("kasa", "KaSA truncates the base weight's smallest singular components and adds a diagonal"),
    "use_qalora": ("qalora", "QALoRA pools the inputs by qalora_group_size before A"),
    "layer_replication": ("layer_replication", "layer_replication duplicates base layers, so module names move"),
    "target_parameters": ("target_parameters", "LoRA on raw parameters (e.g. stacked MoE experts) has its own layout"),
    "trainable_token_indices": ("trainable_tokens", "trainable tokens also rewrite embedding rows"),
}
# init_lora_weights values that only initialise the factors (the base weights are left alone).
INIT_NEUTRAL = frozenset({"gaussian", "eva", "orthogonal"})
# init_lora_weights values that rewrite the base weights when the adapter is made: the saved factors
# then apply to a base that is not the root (unless PEFT converted them on save, which resets it).
INIT_VARIANTS = {
    "pissa": "PiSSA subtracts the principal components from the base weight",
    "corda": "CorDA subtracts its components from the base weight",
    "olora": "OLoRA subtracts its QR factors from the base weight",
    "loftq": "LoftQ replaces the base weight by its quantized copy",
    "lora_ga": "LoRA-GA subtracts its initial factors from the base weight",
}


def merge_refusal(doc: dict) -> tuple[str, str] | None:
    """(reason, message) when an adapter_config.json describes a merge other than
    `W + scale * B @ A`; None for a plain LoRA."""
    for name, (slug, why) in PEFT_VARIANTS.items():
        if doc.get(name):
            return f"{slug}_unsupported", f"{why} ({name} is set): B @ A * scale is not its delta; not read"
    init = doc.get("init_lora_weights")
    if isinstance(init, str):
        key = next((k for k in INIT_VARIANTS if init.lower() == k or init.lower().startswith(f"{k}_")), None)
        if key:
            return (f"{key}_unsupported", f"{INIT_VARIANTS[key]} (init_lora_weights={init!r}): B @ A * scale "
                    "is not the change from the root; not read")
    return None


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
    refusal: tuple[str, str] | None = None  # (reason, message) of a variant B @ A * scale misreads

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
            refusal=merge_refusal(doc),
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
    """The layer a tensor of an adapter file belongs to, named as the root names it: a LoRA
    factor's `<module>.weight`, any other tensor its name without `base_model.model.`."""
    parsed = parse_lora_key(tensor_name)
    return f"{parsed[0]}.weight" if parsed else strip_prefix(tensor_name)


WEIGHT = ".weight"


def _prefixed(a: str, b: str) -> bool:
    """`a` is `b` with leading module names (`model.layers.0.q` and `layers.0.q`)."""
    return a.endswith("." + b)


def match_layers(layers: Iterable[str], modules: Iterable[str]) -> dict[str, str]:
    """layer (a root tensor name) -> the LoRA module that changes it, for each layer some module
    changes. A module changes `<module>.weight`; when no module is named exactly so, one whose
    path differs by leading names (either side carries a prefix the other lacks) counts if it is
    the only one. A layer that is itself a module name (shards and trees planned before layers
    were named by the root's tensors) maps to that module."""
    mods = set(modules)
    out = {}
    for layer in layers:
        if layer in mods:  # a module path: the names of earlier releases
            out[layer] = layer
            continue
        if not layer.endswith(WEIGHT):
            continue
        base = layer[: -len(WEIGHT)]
        if base in mods:
            out[layer] = base
            continue
        near = [m for m in mods if _prefixed(base, m) or _prefixed(m, base)]
        if len(near) == 1:
            out[layer] = near[0]
    return out


def module_layers(modules: Iterable[str], root_names: Iterable[str] | None = None) -> dict[str, str]:
    """LoRA module -> the layer it changes: the root's tensor name when `root_names` are known
    (see `match_layers`), else `<module>.weight`."""
    modules = list(modules)
    found = {}
    if root_names is not None:
        # exact names first, so a prefix match never takes a name another module owns exactly
        names = [n for n in root_names if n.endswith(WEIGHT)]
        exact = {n[: -len(WEIGHT)] for n in names} & set(modules)
        found = {m: f"{m}{WEIGHT}" for m in exact}
        rest = [m for m in modules if m not in exact]
        taken = {f"{m}{WEIGHT}" for m in exact}
        for layer, m in match_layers([n for n in names if n not in taken], rest).items():
            found.setdefault(m, layer)
    return {m: found.get(m, f"{m}{WEIGHT}") for m in modules}


@dataclass(frozen=True)
class LoraPair:
    module: str  # the layer name (see the module docstring)
    a_name: str
    b_name: str
    embedding: bool  # lora_embedding_*: stored as parameters, delta is transposed
    alpha_name: str | None = None  # kohya: the `<key>.alpha` scalar
    component: str | None = None  # diffusers: "unet", "text_encoder", ...
    local: str | None = None  # the module path inside its component, for rank/alpha patterns

    @property
    def config_module(self) -> str:
        return self.local or self.module


PEFT, DIFFUSERS, KOHYA = "peft", "diffusers", "kohya"
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
DENOISERS = ("unet", "transformer")  # their module paths are the root's own tensor names
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_COMPONENT = "|".join(DIFFUSERS_COMPONENTS)
_DIFFUSERS_KEY = re.compile(
    rf"^(?P<comp>{_COMPONENT})\.(?P<module>.+?)\.(?:(?P<peft>lora_[AB])|lora\.(?P<old>down|up))\.weight$")
# the attention-processor format of diffusers < 0.20 (keys without a component are the unet's)
_PROCESSOR_KEY = re.compile(
    rf"^(?:(?P<comp>{_COMPONENT})\.)?(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<old>down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<key>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down|lora_up)\.weight$")
# Tensor-name parts of adapters that are not two LoRA factors.
_NOT_LORA = [
    (lambda p: p.startswith("hada_w"), "lycoris_loha", "LyCORIS LoHa: the delta is a Hadamard product of two low-rank pairs"),
    (lambda p: p.startswith("lokr_w"), "lycoris_lokr", "LyCORIS LoKr: the delta is a Kronecker product"),
    (lambda p: p == "lora_mid", "lycoris_locon", "LyCORIS LoCon with a Tucker core (lora_mid)"),
    (lambda p: p.startswith("oft_"), "lycoris_oft", "LyCORIS OFT/BOFT: the weight is rotated, not added to"),
]


def adapter_format(tensor_names: Iterable[str]) -> str:
    """PEFT, DIFFUSERS or KOHYA, from the key names; AdapterError for LyCORIS kinds."""
    names = list(tensor_names)
    for name in names:
        for part in name.split("."):
            for test, slug, what in _NOT_LORA:
                if test(part):
                    raise AdapterError(f"{slug}_unsupported", f"{what} (tensor {name!r}), not B @ A; not read")
    if any(_KOHYA_KEY.match(n) for n in names):
        return KOHYA
    if any(_DIFFUSERS_KEY.match(n) or _PROCESSOR_KEY.match(n) for n in names):
        return DIFFUSERS
    return PEFT


def looks_like_adapter(tensor_names: Iterable[str]) -> bool:
    """Whether a safetensors file of no telling name holds an adapter (LoRA of any format, or a
    LyCORIS kind) rather than full weights."""
    names = list(tensor_names)
    if any(_LORA_KEY.match(n) or _KOHYA_KEY.match(n) or _DIFFUSERS_KEY.match(n) or _PROCESSOR_KEY.match(n)
           for n in names):
        return True
    try:
        adapter_format(names)
    except AdapterError:
        return True
    return False


def kohya_modules(keys: Iterable[str], root_modules: Iterable[str]) -> dict[str, str]:
    """kohya key (`lora_unet_down_blocks_0_..._to_k`) -> the root module it names. kohya writes
    the module path with `.` made `_`, which cannot be undone alone (names hold `_` too), so each
    root module is flattened the same way and matched; a flat name two modules share stays unmapped."""
    flat: dict[str, list[str]] = {}
    for m in root_modules:
        flat.setdefault("lora_unet_" + m.replace(".", "_"), []).append(m)
    return {k: flat[k][0] for k in keys if len(flat.get(k, ())) == 1}


def _diffusers_module(m: re.Match) -> tuple[str, str, str]:
    """(layer name, component, module path inside it) of a diffusers key."""
    comp = m["comp"] or "unet"
    local = m["module"]
    if "proj" in m.groupdict():
        local = f"{local}.{'to_out.0' if m['proj'] == 'to_out' else m['proj']}"
    return (local if comp in DENOISERS else f"{comp}.{local}"), comp, local


def _pair_parts(name: str, fmt: str, kohya_map: dict[str, str]) -> tuple[str, str, dict] | None:
    """(module, "A" | "B", LoraPair fields) of one key; None for a tensor that is not a factor."""
    if fmt == KOHYA:
        m = _KOHYA_KEY.match(name)
        if not m:
            return None
        fields = {"alpha_name": f"{m['key']}.alpha", "local": m["key"]}
        return kohya_map.get(m["key"], m["key"]), "A" if m["part"] == "lora_down" else "B", fields
    if fmt == DIFFUSERS:
        m = _DIFFUSERS_KEY.match(name) or _PROCESSOR_KEY.match(name)
        if not m:
            return None
        module, comp, local = _diffusers_module(m)
        part = m["peft"][-1] if m.groupdict().get("peft") else ("A" if m["old"] == "down" else "B")
        return module, part, {"component": comp, "local": local}
    m = _LORA_KEY.match(name)
    if not m:
        return None  # heads (modules_to_save), lora_B biases, DoRA magnitudes: not factors
    part, is_embedding = _kind(m)
    return strip_prefix(m["module"]), part, {"embedding": is_embedding}


def lora_modules(tensor_names: Iterable[str], root_modules: Iterable[str] | None = None) -> dict[str, LoraPair]:
    """Group an adapter file's tensor names (any format) into {module: LoraPair}. A module with
    only one of A/B means a broken adapter: AdapterError('missing_factor'). `root_modules` names
    kohya's modules after the root's (unmapped ones keep their kohya key)."""
    names = list(tensor_names)
    fmt = adapter_format(names)
    kohya_map = {}
    if fmt == KOHYA:
        kohya_map = kohya_modules({m["key"] for n in names if (m := _KOHYA_KEY.match(n))}, root_modules or ())
    found: dict[str, dict[str, str]] = {}
    extra: dict[str, dict] = {}
    for name in names:
        parsed = _pair_parts(name, fmt, kohya_map)
        if parsed is None:
            continue
        module, part, fields = parsed
        found.setdefault(module, {})[part] = name
        extra[module] = fields
    pairs = {}
    present = set(names)
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise AdapterError("missing_factor", f"module {module!r} has lora_{next(iter(parts))} but not its partner")
        fields = dict(extra[module])
        embedding = fields.pop("embedding", False)
        if fields.get("alpha_name") not in present:
            fields.pop("alpha_name", None)  # kohya without .alpha: alpha = rank
        pairs[module] = LoraPair(module, parts["A"], parts["B"], embedding, **fields)
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
    """Validate and flatten one module's raw tensors into LoraFactors, with the config's scale."""
    if config.refusal:
        raise AdapterError(*config.refusal)
    A, B = as_matrix(a), as_matrix(b)
    r = config.rank_for(pair.config_module)
    if A.shape[0] != r or B.shape[1] != r:
        raise AdapterError(
            "rank_mismatch",
            f"module {pair.module!r}: A {a.shape} and B {b.shape} do not have the rank {r} that the adapter's config gives it",
        )
    return LoraFactors(pair.module, A, B, config.scale_for(pair.config_module), config.fan_in_fan_out or pair.embedding)


def _plain_factors(pair: LoraPair, a: np.ndarray, b: np.ndarray, alpha: float | None) -> LoraFactors:
    """Factors whose scale is alpha / rank (kohya; diffusers without metadata: alpha = rank)."""
    A, B = as_matrix(a), as_matrix(b)
    if A.shape[0] != B.shape[1]:
        raise AdapterError("rank_mismatch", f"module {pair.module!r}: A {a.shape} and B {b.shape} differ in rank")
    r = A.shape[0]
    if alpha is not None and not np.isfinite(alpha):
        raise AdapterError("bad_alpha", f"module {pair.module!r} has alpha {alpha}")
    return LoraFactors(pair.module, A, B, (alpha or r) / r, pair.embedding)


def diffusers_config(metadata: dict[str, str], component: str) -> LoraAdapterConfig | None:
    """The LoraConfig diffusers saved in a LoRA file's metadata for `component` (a pipeline packs
    each component's keys as `<component>.<key>`); None when the file carries none."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise AdapterError("bad_adapter_config", f"{DIFFUSERS_METADATA_KEY} metadata is not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise AdapterError("bad_adapter_config", f"{DIFFUSERS_METADATA_KEY} metadata is not a JSON object")
    packed = [k for k in doc if k.split(".", 1)[0] in DIFFUSERS_COMPONENTS and "." in k]
    if packed:
        doc = {k.split(".", 1)[1]: v for k, v in doc.items() if k.startswith(f"{component}.")}
        if not doc:
            return None
    return parse_adapter_config(doc)


def read_adapter_factors(
    src: ByteSource,
    modules: Iterable[str] | None = None,
    header: SafetensorsHeader | None = None,
    config: LoraAdapterConfig | None = None,
    *,
    root_modules: Iterable[str] | None = None,
    out_dtype=np.float32,
) -> dict[str, LoraFactors]:
    """Read the factors of `modules` (all LoRA modules when None) from a LoRA file of any format,
    fetching only their bytes (and kohya's alpha scalars). PEFT needs its adapter_config.json
    (`config`); diffusers and kohya carry their scale in the file. kohya modules are named after
    `root_modules` (default: `modules`)."""
    header = header or read_header(src)
    fmt = adapter_format(header.tensors)
    wanted_in = None if modules is None else list(modules)
    pairs = lora_modules(header.tensors, root_modules if root_modules is not None else wanted_in)
    wanted = list(pairs) if wanted_in is None else wanted_in
    unknown = [m for m in wanted if m not in pairs]
    if unknown:
        raise AdapterError("missing_factor", f"{src.name} has no LoRA factors for module {unknown[0]!r}")
    if fmt == PEFT and config is None:
        raise AdapterError("bad_adapter_config", f"{src.name} has PEFT keys but the repo has no adapter_config.json")
    dora = [m for m in wanted if pairs[m].local and f"{pairs[m].local}.dora_scale" in header.tensors]
    if dora:
        raise AdapterError("dora_unsupported", f"module {dora[0]!r} has a kohya dora_scale: DoRA rescales every "
                           "column of W + scale * B @ A, so B @ A * scale is not its delta; not read")
    names = [n for m in wanted for n in (pairs[m].a_name, pairs[m].b_name, pairs[m].alpha_name) if n]
    arrays = read_tensors(src, names, header, out_dtype)
    configs = {c: diffusers_config(header.metadata, c) for c in {pairs[m].component for m in wanted} if c}
    out = {}
    for m in wanted:
        pair = pairs[m]
        a, b = arrays[pair.a_name], arrays[pair.b_name]
        cfg = config if fmt == PEFT else configs.get(pair.component)
        if cfg is not None:
            out[m] = make_factors(cfg, pair, a, b)
        else:
            alpha = float(arrays[pair.alpha_name].reshape(-1)[0]) if pair.alpha_name else None
            out[m] = _plain_factors(pair, a, b, alpha)
    return out


def read_lora_factors(
    src: ByteSource,
    config: LoraAdapterConfig,
    modules: Iterable[str] | None = None,
    header: SafetensorsHeader | None = None,
    out_dtype=np.float32,
) -> dict[str, LoraFactors]:
    """Read the factors of `modules` (all LoRA modules when None) from a PEFT
    `adapter_model.safetensors`, fetching only their bytes."""
    return read_adapter_factors(src, modules, header, config, out_dtype=out_dtype)
