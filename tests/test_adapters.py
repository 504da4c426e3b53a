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
    assert layer_name("base_model.model.encoder.layer.4.attention.self.query.lora_B.default.weight") == (
        "encoder.layer.4.attention.self.query"
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
