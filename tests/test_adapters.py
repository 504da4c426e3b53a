"""LoRA factors read from a real PEFT save reproduce PEFT's own merge."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from storage.adapters import (
    AdapterError,
    LoraAdapterConfig,
    get_pattern_key,
    layer_name,
    lora_modules,
    match_layers,
    module_layers,
    parse_adapter_config,
    parse_lora_key,
    read_lora_factors,
)
from storage.safetensors_reader import LocalFile, as_matrix, read_header


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2 * d)


class Tiny(nn.Module):
    """BERT-like module paths (`encoder.layer.1.attention.self.query`) plus a conv and an embedding."""

    def __init__(self, d=12):
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.ModuleDict({"attention": nn.ModuleDict({"self": Attention(d)})}) for _ in range(2))
        self.conv = nn.Conv2d(3, 8, 3)
        self.pw = nn.Conv2d(8, 8, 1)


TARGETS = ["query", "key", "value", "conv", "pw", "embed"]
CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    # Overlapping patterns: peft takes the first that matches, so layer 1's query gets 6, layer 0's 3.
    # (Listed in sorted order, the order adapter_config.json stores them in: see the test below.)
    "patterns": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={"layer.1.attention.self.query": 6, r"layer\.1\.attention\.self\.key": 2, "query": 3},
        alpha_pattern={"conv": 5, "value": 20},
    ),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"key": 2}, alpha_pattern={"pw": 3}),
}


def build_and_save(tmp_path, kwargs):
    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_()  # B starts at zero: make the delta nonzero
    peft_model.save_pretrained(tmp_path)
    scales = {
        name.removeprefix("base_model.model."): m.scaling["default"]
        for name, m in peft_model.named_modules()
        if hasattr(m, "scaling") and "default" in m.scaling
    }
    merged = peft_model.merge_and_unload().state_dict()
    deltas = {k[: -len(".weight")]: (merged[k] - base[k]).numpy() for k in base if k.endswith(".weight")}
    return deltas, scales


@pytest.mark.parametrize("case", list(CONFIGS))
def test_factors_reproduce_peft_merge(tmp_path, case):
    deltas, scales = build_and_save(tmp_path, CONFIGS[case])
    config = parse_adapter_config((tmp_path / "adapter_config.json").read_text())
    factors = read_lora_factors(LocalFile(tmp_path / "adapter_model.safetensors"), config)
    assert set(factors) == set(scales) == {
        "embed", "conv", "pw", *(f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value"))
    }
    for module, f in factors.items():
        assert f.scale == scales[module], module  # same float, same formula
        np.testing.assert_allclose(f.delta(), as_matrix(deltas[module]), rtol=0, atol=2e-5, err_msg=module)
        assert f.base_tensor == f"{module}.weight"
    if case == "patterns":
        q1 = factors["encoder.layer.1.attention.self.query"]
        assert q1.rank == 6 and q1.scale == 8 / 6
        assert factors["encoder.layer.0.attention.self.query"].rank == 3
        assert factors["encoder.layer.1.attention.self.key"].rank == 2
        assert factors["encoder.layer.0.attention.self.key"].rank == 4
        assert factors["encoder.layer.0.attention.self.value"].scale == 20 / 4
        assert factors["conv"].A.shape == (4, 27) and factors["conv"].B.shape == (8, 4)
    if case == "rslora":
        assert factors["conv"].scale == 8 / 2


def test_names_with_adapter_name_and_layer_names(tmp_path):
    build_and_save(tmp_path, CONFIGS["plain"])
    config = parse_adapter_config((tmp_path / "adapter_config.json").read_text())
    saved = read_lora_factors(LocalFile(tmp_path / "adapter_model.safetensors"), config)
    # The same tensors under in-memory PEFT names (`lora_A.default.weight`, `lora_embedding_A.default`).
    from safetensors.torch import load_file

    renamed = {}
    for k, v in load_file(tmp_path / "adapter_model.safetensors").items():
        k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        k = k.replace("lora_embedding_A", "lora_embedding_A.default").replace("lora_embedding_B", "lora_embedding_B.default")
        renamed[k] = v
    renamed["base_model.model.encoder.layer.0.attention.self.query.lora_B.default.bias"] = torch.zeros(12)
    save_file(renamed, tmp_path / "renamed.safetensors")
    again = read_lora_factors(LocalFile(tmp_path / "renamed.safetensors"), config)
    for m in saved:
        np.testing.assert_array_equal(again[m].A, saved[m].A)
        np.testing.assert_array_equal(again[m].B, saved[m].B)

    assert parse_lora_key("base_model.model.encoder.layer.4.attention.self.query.lora_A.weight") == (
        "encoder.layer.4.attention.self.query",
        "A",
    )
    assert parse_lora_key("base_model.model.x.lora_B.default.bias") is None
    # the layer a factor belongs to is named as the root names the weight it changes
    assert layer_name("base_model.model.encoder.layer.4.attention.self.query.lora_B.default.weight") == (
        "encoder.layer.4.attention.self.query.weight"
    )
    assert layer_name("_blocks.15._project_conv.weight") == "_blocks.15._project_conv.weight"
    assert layer_name("base_model.model.classifier.weight") == "classifier.weight"


def test_only_requested_modules_are_read(tmp_path):
    build_and_save(tmp_path, CONFIGS["plain"])
    config = parse_adapter_config((tmp_path / "adapter_config.json").read_text())
    src = LocalFile(tmp_path / "adapter_model.safetensors")
    header = read_header(src)
    module = "encoder.layer.1.attention.self.value"
    read_lora_factors(src, config, [module], header)
    pair = lora_modules(header.tensors)[module]
    assert src.bytes_read <= header.bytes_needed([pair.a_name, pair.b_name]) + 4096


def test_pattern_key_mirrors_peft():
    from peft.utils.other import get_pattern_key as peft_key

    keys = ["query", r"layer\.1\..*key", "self.value", "attention"]
    for module in ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key", "x.self.value", "xquery", "attention"]:
        assert get_pattern_key(keys, module) == peft_key(keys, module)


def test_broken_adapters_say_why(tmp_path):
    with pytest.raises(AdapterError, match="bad_adapter_config"):
        parse_adapter_config("{not json")
    with pytest.raises(AdapterError, match="not_lora"):
        parse_adapter_config({"peft_type": "IA3"})
    with pytest.raises(AdapterError, match="missing_factor"):
        lora_modules(["base_model.model.q.lora_A.weight"])
    save_file({"base_model.model.q.lora_A.weight": torch.ones(3, 5), "base_model.model.q.lora_B.weight": torch.ones(5, 3)}, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="rank_mismatch"):
        read_lora_factors(LocalFile(tmp_path / "a.safetensors"), LoraAdapterConfig(r=4, lora_alpha=8))
    with pytest.raises(AdapterError, match="dora_unsupported"):
        read_lora_factors(LocalFile(tmp_path / "a.safetensors"), parse_adapter_config(json.dumps({"r": 3, "use_dora": True})))


def test_overlapping_patterns_peft_cannot_reload_are_quarantined(tmp_path):
    """PEFT trains with the patterns in the order given but saves them with sort_keys=True, so
    overlapping patterns whose order changes on save give an adapter that PEFT itself fails to
    reload (size mismatch). The reader follows the file, as PEFT's loader does, and says so."""
    kwargs = dict(r=4, lora_alpha=8, rank_pattern={"query": 3, "layer.1.attention.self.query": 6})
    build_and_save(tmp_path, kwargs)
    config = parse_adapter_config((tmp_path / "adapter_config.json").read_text())
    assert list(config.rank_pattern) == ["layer.1.attention.self.query", "query"]
    with pytest.raises(AdapterError, match="rank_mismatch"):
        read_lora_factors(LocalFile(tmp_path / "adapter_model.safetensors"), config)


# --- which PEFT configs change the merge (derived from the installed peft) ------------------------


def _init_options() -> set[str]:
    import dataclasses
    import re as _re

    field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights")
    return {_re.sub(r"\[[^]]*\]", "4", o) for o in _re.findall(r"'([^']+)'", str(field.type))}


def test_every_lora_config_field_is_classified():
    import dataclasses

    from storage.adapters import INIT_NEUTRAL, NEUTRAL_FIELDS, PEFT_VARIANTS, SCALE_FIELDS, VANILLA_VARIANTS, merge_refusal

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    groups = [SCALE_FIELDS, NEUTRAL_FIELDS, set(PEFT_VARIANTS), VANILLA_VARIANTS & fields]
    assert set().union(*groups) == fields  # a field a new peft adds must be placed
    assert sum(len(g) for g in groups) == len(fields)  # ... in exactly one group
    marked = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    init_field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights")
    marked |= set(init_field.metadata["lora_variants"])
    assert marked <= set(PEFT_VARIANTS) | VANILLA_VARIANTS  # every variant peft marks is refused or verified
    for init in _init_options():  # e.g. "pissa_niter_4"
        assert (init in INIT_NEUTRAL | VANILLA_VARIANTS) != (merge_refusal({"init_lora_weights": init}) is not None), init


def test_variants_are_refused_with_their_name(tmp_path):
    from storage.adapters import INIT_VARIANTS, PEFT_VARIANTS

    save_file({"base_model.model.q.lora_A.weight": torch.ones(3, 5), "base_model.model.q.lora_B.weight": torch.ones(5, 3)},
              tmp_path / "a.safetensors")
    cases = [({name: True}, slug, name) for name, (slug, _) in PEFT_VARIANTS.items()]
    cases += [({"init_lora_weights": init}, f"{init}_unsupported".replace("_niter_4", ""), init)
              for init in [*INIT_VARIANTS, "pissa_niter_4"]]
    for field, reason, named in cases:
        cfg = parse_adapter_config({"r": 3, **field})
        with pytest.raises(AdapterError) as err:
            read_lora_factors(LocalFile(tmp_path / "a.safetensors"), cfg)
        assert err.value.reason.startswith(reason.removesuffix("_unsupported")) and named in err.value.message, field


def test_a_real_dora_adapter_is_refused(tmp_path):
    build_and_save(tmp_path, dict(r=4, lora_alpha=8, use_dora=True))
    config = parse_adapter_config((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(AdapterError) as err:
        read_lora_factors(LocalFile(tmp_path / "adapter_model.safetensors"), config)
    assert err.value.reason == "dora_unsupported" and "DoRA" in err.value.message


def _linear_merge(tmp_path, kwargs):
    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(target_modules=["query", "value"], **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path)
    merged = peft_model.merge_and_unload().state_dict()
    return {k[: -len(".weight")]: (merged[k] - base[k]).numpy() for k in base if k.endswith(".weight")}


@pytest.mark.parametrize("variant", ["mica", "velora"])
def test_variants_with_a_vanilla_merge_reproduce_peft(tmp_path, variant):
    from peft.tuners.lora.config import VeloraConfig

    kwargs = dict(r=4, lora_alpha=8, init_lora_weights="mica") if variant == "mica" else \
        dict(r=4, lora_alpha=8, velora_config=VeloraConfig())
    deltas = _linear_merge(tmp_path, kwargs)
    config = parse_adapter_config((tmp_path / "adapter_config.json").read_text())
    factors = read_lora_factors(LocalFile(tmp_path / "adapter_model.safetensors"), config)
    assert len(factors) == 4
    for module, f in factors.items():
        np.testing.assert_allclose(f.delta(), deltas[module], rtol=0, atol=2e-5, err_msg=module)


# --- diffusers, kohya, LyCORIS ------------------------------------------------------------------

UNET_MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
                "mid_block.resnets.0.conv1"]


def unet():
    """A module tree with a diffusers UNet's names (linear to_k/to_out.0, a 3x3 conv)."""
    torch.manual_seed(1)
    root = nn.Module()
    for name in UNET_MODULES:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Conv2d(4, 6, 3) if leaf == "conv1" else nn.Linear(10, 8))
    return root


def diffusers_lora(tmp_path, cfg: LoraConfig, metadata: bool, rename=None):
    """What diffusers' `save_lora_weights` writes: peft's injected state dict under `unet.`, the
    LoraConfig packed as `unet.<key>` in the `lora_adapter_metadata` metadata. Returns the deltas
    peft's own merge gives."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    model = unet()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = inject_adapter_in_model(cfg, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    if rename:
        state = {rename(k): v for k, v in state.items()}
    meta = {"format": "pt"}
    if metadata:
        doc = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
        meta["lora_adapter_metadata"] = json.dumps(doc, sort_keys=True, default=str)
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors", metadata=meta)
    for m in model.modules():
        if hasattr(m, "merge"):
            m.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return {k[: -len(".weight")]: (merged[k] - base[k]).numpy() for k in base if k.endswith(".weight")}


def test_diffusers_lora_scale_comes_from_its_metadata(tmp_path):
    from storage.adapters import read_adapter_factors

    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["to_k", "to_out.0", "conv1"], rank_pattern={"conv1": 2})
    deltas = diffusers_lora(tmp_path, cfg, metadata=True)
    factors = read_adapter_factors(LocalFile(tmp_path / "pytorch_lora_weights.safetensors"))
    assert set(factors) == set(UNET_MODULES)  # named like the root's unet tensors
    assert factors[UNET_MODULES[2]].rank == 2 and factors[UNET_MODULES[2]].scale == 6.0
    for module, f in factors.items():
        np.testing.assert_allclose(f.delta(), as_matrix(deltas[module]), rtol=0, atol=2e-5, err_msg=module)


@pytest.mark.parametrize("keys", ["peft", "lora.down", "processor"])
def test_diffusers_lora_without_metadata_has_scale_one(tmp_path, keys):
    """No metadata: diffusers builds the LoraConfig with lora_alpha = r, so scale 1.0."""
    from storage.adapters import read_adapter_factors

    rename = {
        "peft": None,
        "lora.down": lambda k: k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."),
        "processor": lambda k: k.replace("attn2.to_out.0.lora_A", "attn2.processor.to_out_lora.down")
                                .replace("attn2.to_out.0.lora_B", "attn2.processor.to_out_lora.up")
                                .replace("attn2.to_k.lora_A", "attn2.processor.to_k_lora.down")
                                .replace("attn2.to_k.lora_B", "attn2.processor.to_k_lora.up"),
    }[keys]
    targets = ["to_k", "to_out.0"] if keys == "processor" else ["to_k", "to_out.0", "conv1"]
    deltas = diffusers_lora(tmp_path, LoraConfig(r=4, lora_alpha=4, target_modules=targets), metadata=False, rename=rename)
    factors = read_adapter_factors(LocalFile(tmp_path / "pytorch_lora_weights.safetensors"))
    assert set(factors) == set(UNET_MODULES[: len(targets)])
    for module, f in factors.items():
        assert f.scale == 1.0
        np.testing.assert_allclose(f.delta(), as_matrix(deltas[module]), rtol=0, atol=2e-5, err_msg=module)


def kohya_file(path, alphas: dict[str, float | None], rank=4, seed=2):
    """A kohya-ss LoRA as sd-scripts' LoRANetwork saves it: `lora_unet_<module, '.' -> '_'>` with
    lora_down (r x in[ x k x k]), lora_up (out x r[ x 1 x 1]) and an `alpha` scalar. Returns the
    deltas kohya merges: W += up @ down * alpha / r (conv kernels flattened the same way)."""
    g = torch.Generator().manual_seed(seed)
    base = unet().state_dict()
    tensors, deltas = {}, {}
    for module, alpha in alphas.items():
        w = base[f"{module}.weight"]
        key = "lora_unet_" + module.replace(".", "_")
        down = torch.randn(rank, *w.shape[1:], generator=g) if w.ndim == 4 else torch.randn(rank, w.shape[1], generator=g)
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down.half(), up.half()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha).half()
        scale = (alpha or rank) / rank
        deltas[module] = (up.half().float().reshape(w.shape[0], rank) @ down.half().float().reshape(rank, -1)).numpy() * scale
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(rank, 5).half()
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(5, rank).half()
    save_file(tensors, path, metadata={"ss_network_dim": str(rank)})
    return deltas


def test_kohya_lora_names_map_to_the_root_and_scale_is_alpha_over_rank(tmp_path):
    from storage.adapters import lora_modules, read_adapter_factors

    alphas = {UNET_MODULES[0]: 1.0, UNET_MODULES[1]: None, UNET_MODULES[2]: 0.0}  # absent or 0: alpha = rank
    deltas = kohya_file(tmp_path / "style.safetensors", alphas)
    src = LocalFile(tmp_path / "style.safetensors")
    root_names = [f"{m}.weight" for m in UNET_MODULES] + [f"{m}.bias" for m in UNET_MODULES]
    root_modules = [n.removesuffix(".weight") for n in root_names if n.endswith(".weight")]
    pairs = lora_modules(read_header(src).tensors, root_modules)
    assert set(UNET_MODULES) < set(pairs)  # mapped; the text encoder's key stays as kohya wrote it
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in pairs
    factors = read_adapter_factors(src, UNET_MODULES)
    assert [factors[m].scale for m in UNET_MODULES] == [0.25, 1.0, 1.0]
    for module in UNET_MODULES:
        np.testing.assert_allclose(factors[module].delta(), deltas[module], rtol=1e-5, atol=1e-5, err_msg=module)


@pytest.mark.parametrize("kind, keys", [
    ("lycoris_loha", ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]),
    ("lycoris_lokr", ["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"]),
])
def test_lycoris_is_refused_with_its_kind(tmp_path, kind, keys):
    from storage.adapters import read_adapter_factors

    key = "lora_unet_" + UNET_MODULES[0].replace(".", "_")
    save_file({f"{key}.{k}": torch.ones(2, 2) if k != "alpha" else torch.tensor(1.0) for k in keys}, tmp_path / "l.safetensors")
    with pytest.raises(AdapterError) as err:
        read_adapter_factors(LocalFile(tmp_path / "l.safetensors"), [UNET_MODULES[0]])
    assert err.value.reason == f"{kind}_unsupported" and "LyCORIS" in err.value.message


def test_modules_are_named_by_the_roots_tensors_whatever_the_prefix():
    """PEFT wraps the model it adapts (`base_model.model.` + the task model's paths, `bert.` for a
    BertFor* model), roots are saved with or without their task prefix: a module's layer is the
    root tensor it changes, matched exactly first, else by a unique prefix difference."""
    root = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.1.self_attn.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]
    mods = ["model.layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "embed_tokens"]
    assert module_layers(mods, root) == {"model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj.weight",
                                         "layers.1.self_attn.q_proj": "model.layers.1.self_attn.q_proj.weight",
                                         "embed_tokens": "model.embed_tokens.weight"}
    assert module_layers(["bert.encoder.layer.0.attention.self.query"], ["encoder.layer.0.attention.self.query.weight"]) == {
        "bert.encoder.layer.0.attention.self.query": "encoder.layer.0.attention.self.query.weight"}
    assert module_layers(["x.q"]) == {"x.q": "x.q.weight"}  # no root known: the module's own weight
    # two modules a prefix apart from one name: neither is guessed
    assert match_layers(["q.weight"], ["a.q", "b.q"]) == {}
    assert match_layers(["enc.q.weight", "enc.k.weight", "enc.q"], ["enc.q"]) == {"enc.q.weight": "enc.q", "enc.q": "enc.q"}


def test_an_adapters_layers_are_the_roots_tensors_in_the_roots_orientation(tmp_path):
    """What planning offers for an adapter: the root tensors its modules change, shaped as the
    root stores them (an embedding LoRA changes a num_embeddings x dim weight), and what
    extraction then reads for those names equals peft's merge."""
    from storage.extract import ExtractJob, extract_model, model_layer_shapes
    from storage.shards import read_layer
    from storage.sources import LocalOpener

    deltas, _ = build_and_save(tmp_path / "child", CONFIGS["plain"])
    torch.manual_seed(0)
    root = {k: v.contiguous() for k, v in Tiny().state_dict().items()}
    root_shapes = {k: tuple(v.shape) for k, v in root.items()}
    opener = LocalOpener("org/child", "0" * 40, str(tmp_path / "child"))
    files = ("adapter_config.json", "adapter_model.safetensors")
    shapes, adapter = model_layer_shapes(opener, files, root_shapes)
    assert adapter and shapes["embed.weight"] == (20, 12) and shapes["conv.weight"] == (8, 27)
    assert shapes["encoder.layer.0.attention.self.value.weight"] == (24, 12)
    assert set(shapes) == {f"{m}.weight" for m in deltas if m in {"embed", "conv", "pw"} or "attention" in m}
    res = extract_model(ExtractJob(opener, "org/root", files, ("embed.weight", "conv.weight"), str(tmp_path / "shards"),
                                   tuple((l, shapes[l]) for l in ("embed.weight", "conv.weight"))))
    assert res.status == "ok", res.reason
    for layer in ("embed.weight", "conv.weight"):
        (row,) = read_layer(tmp_path / "shards", "org/root", layer)
        np.testing.assert_allclose(row.scale * row.B @ row.A, as_matrix(deltas[layer.removesuffix(".weight")]),
                                   rtol=0, atol=2e-5)
    res = extract_model(ExtractJob(opener, "org/root", files, ("lm_head.weight",), str(tmp_path / "shards")))
    assert res.status == "quarantined" and "no LoRA factors for layer 'lm_head.weight'" in res.reason
