"""Checkpoints as the Hub ships them, read through extraction: FP8 copies dequantized like the
library that wrote them, integer packings refused with their method named, dtypes the reader does
not know refused for that layer only."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file

from storage.extract import ExtractJob, extract_model, header_shapes
from storage.quantized import QuantConfig, parse_quant_config, plan_layer
from storage.shards import read_layer
from storage.sources import LocalOpener

SHA = "0" * 40
LAYER = "model.layers.0.self_attn.q_proj.weight"
MODULE = LAYER.removesuffix(".weight")


def repo(tmp_path: Path, name: str, tensors: dict, config: dict | None = None,
         filename: str = "model.safetensors", **json_files) -> LocalOpener:
    d = tmp_path / name
    (d / filename).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(next(iter(tensors.values())), torch.Tensor):
        save_file(tensors, str(d / filename))
    else:
        np_save_file(tensors, str(d / filename))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    for f, doc in json_files.items():
        (d / f.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (d / f.replace("__", "/")).write_text(json.dumps(doc))
    return LocalOpener(f"org/{name}", SHA, str(d))


def extract(tmp_path: Path, opener: LocalOpener, layers=(LAYER,)):
    files = tuple(sorted(p.relative_to(opener.folder).as_posix() for p in Path(opener.folder).rglob("*") if p.is_file()))
    res = extract_model(ExtractJob(opener, "org/root", files, tuple(layers), str(tmp_path / "shards")))
    rows = {l: read_layer(tmp_path / "shards", "org/root", l, {opener.repo_id}) for l in layers} if res.status == "ok" else {}
    return res, {l: r[0] for l, r in rows.items() if r}


# --- FP8 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fine_grained_fp8_dequantizes_like_transformers(tmp_path, scale_fmt):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[16, 32], scale_fmt=scale_fmt))
    w = torch.randn(48, 96)
    stored = Fp8Quantize(quantizer).convert({LAYER: w, "model.norm.weight": torch.ones(96)})
    ref = Fp8Dequantize(quantizer).convert({"weight": stored[LAYER], "weight_scale_inv": stored[f"{MODULE}.weight_scale_inv"]},
                                           model=None)["weight"].float().numpy()
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 32], "fmt": "e4m3"}}
    res, rows = extract(tmp_path, repo(tmp_path, "fp8", stored, config))
    assert res.status == "ok", res.reason
    row = rows[LAYER]
    assert (row.kind, row.dtype, tuple(row.shape)) == ("dequantized", "F8_E4M3", (48, 96))
    np.testing.assert_array_equal(row.X, ref)
    assert np.abs(row.X - w.numpy()).max() < 0.1 * np.abs(w.numpy()).max()  # and it is the weight


def test_block_scales_cover_a_ragged_edge(tmp_path):
    """Shapes not divisible by the block (DeepSeek's ceil-sized scale grid)."""
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((50, 40)).astype(np.float32)).to(torch.float8_e4m3fn)
    s = torch.from_numpy(rng.uniform(0.5, 2, (4, 3)).astype(np.float32))  # ceil(50/16) x ceil(40/16)
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    res, rows = extract(tmp_path, repo(tmp_path, "ragged", {LAYER: q, f"{MODULE}.weight_scale_inv": s}, config))
    expected = np.array([[float(q[i, j].float()) * float(s[i // 16, j // 16]) for j in range(40)] for i in range(50)],
                        np.float32)
    np.testing.assert_array_equal(rows[LAYER].X, expected)


@pytest.mark.parametrize("strategy", ["tensor", "channel", "group"])
def test_compressed_tensors_fp8_scales(tmp_path, strategy):
    from transformers.integrations.compressed_tensors import quantize_fp8_per_row

    w = torch.randn(24, 64)
    if strategy == "channel":
        q, s = quantize_fp8_per_row(w)
        s = s.unsqueeze(1)  # compressed-tensors stores channel scales as [out, 1]
    elif strategy == "tensor":
        s = (w.abs().max() / torch.finfo(torch.float8_e4m3fn).max).reshape(1)
        q = (w / s).to(torch.float8_e4m3fn)
    else:
        s = w.reshape(24, 4, 16).abs().amax(-1) / torch.finfo(torch.float8_e4m3fn).max  # 4 groups of 16
        q = (w.reshape(24, 4, 16) / s[..., None]).reshape(24, 64).to(torch.float8_e4m3fn)
    s = s.to(torch.bfloat16)  # stored in the model's dtype
    ref = (q.float().reshape(24, -1, 64 // s.shape[-1]) * s.float().reshape(24 if s.numel() > 1 else 1, -1, 1)).reshape(24, 64)
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}
    tensors = {LAYER: q, f"{MODULE}.weight_scale": s, f"{MODULE}.input_scale": torch.ones(1)}
    res, rows = extract(tmp_path, repo(tmp_path, f"ct-{strategy}", tensors, config))
    assert res.status == "ok", res.reason
    assert rows[LAYER].kind == "dequantized"
    np.testing.assert_allclose(rows[LAYER].X, ref.numpy(), rtol=1e-6, atol=0)


def test_block_scales_without_a_block_size_are_refused(tmp_path):
    q = torch.zeros(32, 32).to(torch.float8_e4m3fn)
    res, _ = extract(tmp_path, repo(tmp_path, "noblock", {LAYER: q, f"{MODULE}.weight_scale_inv": torch.ones(2, 2)}, {}))
    assert res.status == "quarantined" and res.reason.startswith("bad_quantization: ") and "weight_block_size" in res.reason


def test_fp8_weights_without_scales_and_unknown_dtypes(tmp_path):
    """A plain FP8 checkpoint (no scales) is read as stored; before ml_dtypes it was quarantined."""
    w = torch.randn(8, 12)
    res, rows = extract(tmp_path, repo(tmp_path, "plain8", {LAYER: w.to(torch.float8_e5m2)}))
    assert res.status == "ok" and rows[LAYER].kind == "dense" and rows[LAYER].dtype == "F8_E5M2"
    np.testing.assert_array_equal(rows[LAYER].X, w.to(torch.float8_e5m2).float().numpy())


# --- refused packings --------------------------------------------------------------------------


def gptq_tensors(bits=4, group=32, out=64, inn=64):
    """GPTQ/AWQ layout (AutoGPTQ, AutoAWQ, gptqmodel): int32-packed codes, zeros and fp16 scales."""
    per = 32 // bits
    return {f"{MODULE}.qweight": np.zeros((inn // per, out), np.int32), f"{MODULE}.qzeros": np.zeros((inn // group, out // per), np.int32),
            f"{MODULE}.scales": np.ones((inn // group, out), np.float16), f"{MODULE}.g_idx": np.arange(inn, dtype=np.int32) // group,
            "model.norm.weight": np.ones(out, np.float32)}


def bnb4_tensors():
    return {LAYER: np.zeros((2048, 1), np.uint8), f"{LAYER}.absmax": np.ones(64, np.float32),
            f"{LAYER}.quant_map": np.linspace(-1, 1, 16).astype(np.float32),
            f"{LAYER}.quant_state.bitsandbytes__nf4": np.zeros(120, np.uint8)}


def bnb8_tensors():
    return {LAYER: np.zeros((64, 64), np.int8), f"{MODULE}.SCB": np.ones(64, np.float32),
            f"{MODULE}.weight_format": np.zeros((), np.uint8)}


@pytest.mark.parametrize("name, tensors, qc, reason, words", [
    ("gptq", gptq_tensors(), {"quant_method": "gptq", "bits": 4, "group_size": 32}, "quantized_gptq", "GPTQ"),
    ("awq", gptq_tensors(), {"quant_method": "awq", "bits": 4, "group_size": 32}, "quantized_awq", "AWQ"),
    ("undeclared", gptq_tensors(), None, "quantized_gptq_or_awq", "GPTQ or AWQ"),
    ("nf4", bnb4_tensors(), {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
     "quantized_bitsandbytes", "bitsandbytes 4-bit (NF4)"),
    ("int8", bnb8_tensors(), {"quant_method": "bitsandbytes", "load_in_8bit": True}, "quantized_bitsandbytes", "LLM.int8"),
    ("packed", {f"{MODULE}.weight_packed": np.zeros((64, 8), np.int32), f"{MODULE}.weight_scale": np.ones((64, 1), np.float32)},
     {"quant_method": "compressed-tensors", "format": "pack-quantized"}, "quantized_compressed_tensors", "weight_packed"),
])
def test_integer_packings_are_refused_with_their_method(tmp_path, name, tensors, qc, reason, words):
    config = {"quantization_config": qc} if qc else {}
    res, _ = extract(tmp_path, repo(tmp_path, name, tensors, config))
    assert res.status == "quarantined"
    assert res.reason.startswith(f"{reason}: ") and words in res.reason and "not weights" in res.reason
    # refused from the names alone: no tensor bytes fetched beyond the header and config.json
    assert res.bytes_read < 2048


def test_an_unquantized_layer_of_a_quantized_model_is_read(tmp_path):
    """GPTQ keeps some modules in float (lm_head, modules_to_not_convert): those layers read as dense."""
    tensors = {**gptq_tensors(), "lm_head.weight": np.ones((10, 64), np.float16)}
    res, rows = extract(tmp_path, repo(tmp_path, "mixed", tensors, {"quantization_config": {"quant_method": "gptq"}}),
                        layers=("lm_head.weight",))
    assert res.status == "ok" and rows["lm_head.weight"].kind == "dense"


def test_integer_tensors_are_never_weights(tmp_path):
    res, _ = extract(tmp_path, repo(tmp_path, "ints", {LAYER: np.ones((4, 4), np.int8)}))
    assert res.status == "quarantined" and res.reason.startswith("not_float: ") and "I8" in res.reason


def test_an_unknown_dtype_quarantines_only_the_model_that_needs_it(tmp_path):
    d = tmp_path / "future"
    d.mkdir()
    blob = json.dumps({LAYER: {"dtype": "F2_E1M0", "shape": [4, 4], "data_offsets": [0, 4]},
                       "other.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]}}).encode()
    (d / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(20))
    opener = LocalOpener("org/future", SHA, str(d))
    res, _ = extract(tmp_path, opener)
    assert res.status == "quarantined" and res.reason.startswith("unsupported_dtype: unsupported dtype F2_E1M0")
    res, rows = extract(tmp_path, opener, layers=("other.weight",))
    assert res.status == "ok" and rows["other.weight"].X.shape == (2, 2)


def test_quant_config_and_plans():
    cfg = parse_quant_config(json.dumps({"quantization_config": {"quant_method": "FP8", "weight_block_size": [128, 128]}}))
    assert cfg == QuantConfig("fp8", (128, 128), None, None)
    assert parse_quant_config(b"{not json") == QuantConfig()
    names = {LAYER, f"{MODULE}.weight_scale_inv"}
    plan = plan_layer(LAYER, names, cfg)
    assert plan.tensors == [LAYER, f"{MODULE}.weight_scale_inv"] and plan.block_size == (128, 128) and plan.dequantized
    assert not plan_layer("x.weight", {"x.weight"}, QuantConfig()).dequantized


# --- file layouts ---------------------------------------------------------------------------------


def test_sharded_and_diffusers_layouts_are_read_through_their_index(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    d = tmp_path / "sd"
    (d / "unet").mkdir(parents=True)
    np_save_file({"down.weight": a}, str(d / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    np_save_file({"up.weight": b}, str(d / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"down.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "up.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    opener = LocalOpener("org/sd", SHA, str(d))
    files = tuple(sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()))
    shapes, _ = header_shapes(opener, files)
    assert shapes == {"down.weight": (6, 4), "up.weight": (3, 4)}
    res, rows = extract(tmp_path, opener, layers=("down.weight", "up.weight"))
    assert res.status == "ok", res.reason
    np.testing.assert_array_equal(rows["down.weight"].X, a)
    np.testing.assert_array_equal(rows["up.weight"].X, b)


# --- adapters without adapter_config.json ---------------------------------------------------------


def test_kohya_and_diffusers_loras_extract_as_factors(tmp_path):
    from peft import LoraConfig
    from test_adapters import UNET_MODULES, diffusers_lora, kohya_file

    k = tmp_path / "kohya"
    k.mkdir()
    deltas = kohya_file(k / "my_style_v2.safetensors", dict.fromkeys(UNET_MODULES, 2.0))
    (k / "README.md").write_text("---\nbase_model: org/root\ntags: [lora]\n---\n")
    layers = [f"{m}.weight" for m in UNET_MODULES]  # the root's unet tensors
    res, rows = extract(tmp_path, LocalOpener("org/kohya", SHA, str(k)), layers=layers)
    assert res.status == "ok", res.reason
    for m, layer in zip(UNET_MODULES, layers):
        row = rows[layer]
        assert row.kind == "lora" and row.scale == 0.5 and row.rank == 4
        assert row.read_from == [f"lora_unet_{m.replace('.', '_')}.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha")]
        np.testing.assert_allclose(row.scale * row.B @ row.A, deltas[m], rtol=1e-5, atol=1e-5)
    # trees planned before layers were named by the root's tensors still ask for module paths
    res, old = extract(tmp_path, LocalOpener("org/kohya", SHA, str(k)), layers=UNET_MODULES)
    assert res.status == "ok" and set(old) == set(UNET_MODULES)
    np.testing.assert_array_equal(old[UNET_MODULES[0]].A, rows[layers[0]].A)

    d = tmp_path / "diffusers"
    d.mkdir()
    deltas = diffusers_lora(d, LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_out.0", "conv1"]), metadata=True)
    res, rows = extract(tmp_path, LocalOpener("org/diffusers", SHA, str(d)), layers=UNET_MODULES)
    assert res.status == "ok", res.reason
    np.testing.assert_allclose(rows[UNET_MODULES[2]].scale * rows[UNET_MODULES[2]].B @ rows[UNET_MODULES[2]].A,
                               deltas[UNET_MODULES[2]].reshape(6, -1), atol=2e-5)


def test_a_lycoris_file_is_quarantined_with_its_kind_and_a_full_single_file_is_read(tmp_path):
    d = tmp_path / "loha"
    d.mkdir()
    key = "lora_unet_down_blocks_0_attn_to_k"
    save_file({f"{key}.hada_w1_a": torch.ones(8, 2), f"{key}.hada_w1_b": torch.ones(2, 8)}, str(d / "loha.safetensors"))
    res, _ = extract(tmp_path, LocalOpener("org/loha", SHA, str(d)), layers=("down_blocks.0.attn.to_k",))
    assert res.status == "quarantined" and res.reason.startswith("lycoris_loha_unsupported: LyCORIS LoHa")

    f = tmp_path / "single"
    f.mkdir()
    np_save_file({"model.diffusion_model.out.weight": np.ones((3, 2), np.float32)}, str(f / "v1-5-pruned.safetensors"))
    res, rows = extract(tmp_path, LocalOpener("org/single", SHA, str(f)), layers=("model.diffusion_model.out.weight",))
    assert res.status == "ok" and rows["model.diffusion_model.out.weight"].kind == "dense"


# --- repos as the Hub writes them: no config.json, no safetensors -------------------------------


class Trap:
    """Unpickling this writes a marker file: the proof a pickle was never loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_lora_trees_without_config_and_repos_without_safetensors(tmp_path):
    import pickle

    from minilake import T0, card, write_repo
    from peft import LoraConfig
    from test_adapters import UNET_MODULES, diffusers_lora, kohya_file, unet

    from storage.catalog import MODELS, Catalog
    from storage.sources import LocalSource
    from tasks.crawl import crawl_source
    from tasks.extract import jobs_for_tree, plan_candidate_layers

    lake, marker = tmp_path / "lake", tmp_path / "unpickled"
    child = "base_model: sd/root\nbase_model_relation: {}\nlabels: [{}]"
    root = write_repo(lake, "sd/root", {"README.md": card("license: openrail"),
                                        "model_index.json": {"_class_name": "StableDiffusionPipeline"}}, t=T0)
    (root / "unet").mkdir()
    save_file({k: v.contiguous() for k, v in unet().state_dict().items()}, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    lora = write_repo(lake, "sd/diffusers-lora", {"README.md": card(child.format("adapter", "dog"))}, t=T0 + 60)
    diffusers_lora(lora, LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_out.0", "conv1"]), metadata=True)
    kohya = write_repo(lake, "sd/kohya-lora", {"README.md": card(child.format("adapter", "cat"))}, t=T0 + 120)
    kohya_file(kohya / "cat_style_v1.safetensors", dict.fromkeys(UNET_MODULES, 2.0))
    write_repo(lake, "sd/pickle-ft", {"README.md": card(child.format("finetune", "bird")),
                                      "pytorch_model.bin": pickle.dumps(Trap(str(marker)))}, t=T0 + 180)
    write_repo(lake, "sd/gguf", {"README.md": card(child.format("quantized", "fish")), "model-Q4_K_M.gguf": b"GGUF\3"},
               t=T0 + 240)

    catalog = Catalog(str(tmp_path / "catalog"))
    source = LocalSource(lake)
    crawl_source(source, catalog)
    rows = {r["repo_id"]: r for r in catalog.read(MODELS).to_pylist()}
    for repo_id, label in (("sd/diffusers-lora", "dog"), ("sd/kohya-lora", "cat")):
        assert (rows[repo_id]["status"], rows[repo_id]["tree_id"], rows[repo_id]["labels"]) == ("ok", "sd/root", [label])
    assert rows["sd/root"]["status"] == "ok"  # a pipeline needs no config.json
    pickle_row, gguf_row = rows["sd/pickle-ft"], rows["sd/gguf"]
    assert (pickle_row["status"], pickle_row["tree_id"], pickle_row["parents"]) == ("no_safetensors", "sd/root", ["sd/root"])
    assert pickle_row["reason"] == "only pytorch_model.bin (pickle): no safetensors to read, never opened"
    assert gguf_row["status"] == "no_safetensors" and gguf_row["reason"].startswith("only GGUF")

    models = list(rows.values())
    layers = plan_candidate_layers(source, models, "sd/root")
    unet_layers = [f"{m}.weight" for m in UNET_MODULES]  # the root's unet tensor names
    assert set(unet_layers) <= set(layers)
    jobs = jobs_for_tree(source, models, "sd/root", {m: layers[m] for m in unet_layers}, str(tmp_path / "shards"))
    assert sorted(j.opener.repo_id for j in jobs) == ["sd/diffusers-lora", "sd/kohya-lora"]  # no pickle, no GGUF
    for job in jobs:
        res = extract_model(job)
        assert res.status == "ok" and sorted(res.layers) == sorted(unet_layers), res.reason
    assert not marker.exists()


# --- one layer name per tree, whatever the child's format ------------------------------------------


class _Attn(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)


class _Layer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = _Attn(d)


class _Inner(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(d), _Layer(d)])


class TinyLM(torch.nn.Module):
    """Llama's tensor names (`model.layers.<i>.self_attn.q_proj.weight`, `lm_head.weight`)."""

    def __init__(self, d=16):
        super().__init__()
        self.model, self.lm_head = _Inner(d), torch.nn.Linear(d, 10, bias=False)


def _peft_child(folder: Path, root_sd: dict, target, seed: int, base_name: str | None = None) -> dict[str, np.ndarray]:
    """A PEFT LoRA saved by peft itself on `target` (the whole model, or its inner `model`, whose
    module paths then lack the `model.` prefix); returns peft's merged deltas by root tensor name."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lm = TinyLM()
    lm.load_state_dict(root_sd)
    inner = lm if target == "whole" else lm.model
    peft_model = get_peft_model(inner, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(folder))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_name}))
    merged = peft_model.merge_and_unload()
    prefix = "" if target == "whole" else "model."
    return {prefix + k: (v - root_sd[prefix + k]).numpy() for k, v in merged.state_dict().items()}


def test_a_tree_of_every_format_names_its_layers_by_the_roots_tensors(tmp_path):
    """Full fine-tune, PEFT adapters (one saved on the whole model, one on its inner module: no
    `model.` prefix, lineage only in adapter_config.json) and an FP8 copy: `probex extract --tree
    T --layers <root tensor>` reads that layer from every child, each row saying how."""
    from minilake import T0, card, write_repo
    from typer.testing import CliRunner

    from probex.cli import app
    from storage.catalog import MODELS, Catalog

    lake, home = tmp_path / "lake", tmp_path / "home"
    torch.manual_seed(0)
    root_sd = {k: v.detach().clone() for k, v in TinyLM().state_dict().items()}
    child = lambda rel: card(f"base_model: llm/root\nbase_model_relation: {rel}\nlabels: [cat]")
    write_repo(lake, "llm/root", {"README.md": card("license: mit"), "config.json": {}}, t=T0)
    save_file(root_sd, str(lake / "llm/root/model.safetensors"))

    full_sd = {k: v + 0.1 * torch.randn_like(v) for k, v in root_sd.items()}
    write_repo(lake, "llm/full-ft", {"README.md": child("finetune"), "config.json": {}}, t=T0 + 60)
    save_file(full_sd, str(lake / "llm/full-ft/model.safetensors"))

    deltas = {}
    for i, (name, target, base) in enumerate([("peft", "whole", None), ("peft-bare", "inner", "llm/root")]):
        folder = lake / "llm" / name
        deltas[name] = _peft_child(folder, root_sd, target, seed=10 + i, base_name=base)
        front = child("adapter") if base is None else "labels: [dog]"  # no card lineage: adapter_config.json's
        write_repo(lake, f"llm/{name}", {"README.md": card(front)}, t=T0 + 120 + 60 * i)
        for f in folder.iterdir():
            os.utime(f, (T0 + 120 + 60 * i,) * 2)

    fp8 = {}  # compressed-tensors FP8, one scale per tensor, of the root plus an update
    for k, v in root_sd.items():
        if "self_attn" in k:
            w = v + 0.1 * torch.randn_like(v)
            s = (w.abs().max() / torch.finfo(torch.float8_e4m3fn).max).reshape(1)
            fp8[k], fp8[k.removesuffix(".weight") + ".weight_scale"] = (w / s).to(torch.float8_e4m3fn), s
        else:
            fp8[k] = v
    write_repo(lake, "llm/fp8", {"README.md": child("quantized"), "config.json": {
        "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}}, t=T0 + 300)
    save_file(fp8, str(lake / "llm/fp8/model.safetensors"))

    runner = CliRunner()
    r = runner.invoke(app, ["crawl", "--source", str(lake), "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    rows = {m["repo_id"]: m for m in Catalog(str(home / "catalog")).read(MODELS).to_pylist()}
    assert {m: rows[m]["tree_id"] for m in rows} == dict.fromkeys(rows, "llm/root")
    assert rows["llm/peft-bare"]["lineage_source"] == "adapter_config"

    layer = "model.layers.1.self_attn.q_proj.weight"
    r = runner.invoke(app, ["extract", "--tree", "llm/root", "--layers", layer, "--workers", "1",
                            "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # four children, and the root: its children mix full fine-tunes and adapters, so its expert
    # reads each child as its change from the root's own layer
    assert doc["quarantined"] == [] and doc["extracted"] == 5 and doc["layers"] == {"llm/root": [layer]}
    got = {row.repo_id: row for row in read_layer(home / "shards", "llm/root", layer)}
    assert {m: got[m].kind for m in got} == {"llm/full-ft": "dense", "llm/peft": "lora", "llm/peft-bare": "lora",
                                             "llm/fp8": "dequantized", "llm/root": "dense"}
    np.testing.assert_array_equal(got["llm/root"].X, root_sd[layer].numpy())
    np.testing.assert_array_equal(got["llm/full-ft"].X, full_sd[layer].numpy())
    for name in ("peft", "peft-bare"):
        row = got[f"llm/{name}"]
        assert row.rank == 2 and row.read_from[0].endswith("q_proj.lora_A.weight")
        np.testing.assert_allclose(row.scale * row.B @ row.A, deltas[name][layer], rtol=1e-5, atol=1e-6)
    scale_name = layer.removesuffix(".weight") + ".weight_scale"
    np.testing.assert_array_equal(got["llm/fp8"].X, fp8[layer].float().numpy() * fp8[scale_name].numpy())
    assert got["llm/fp8"].read_from == [layer, scale_name] and got["llm/full-ft"].read_from == [layer]

    # the tree's candidates are the root's tensors every format offers
    tree = Catalog(str(home / "catalog")).tree("llm/root")
    assert set(tree["candidate_layers"]) == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")}
