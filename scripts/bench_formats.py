"""Issue 17's figures: every checkpoint, adapter and quantized format against its reference, and the
bytes and requests one layer costs over HTTP.

Each format is built at run time in a temporary folder by the library that writes it where it is
installed (torch + safetensors, peft, transformers' FP8 quantizers; diffusers is not a dependency,
so its LoRA files are written by their documented key names, peft's state dict under `unet.`, as
tests/test_adapters.py does), then read the way the product reads a child: `extract_model` on an
`ExtractJob` (header, byte ranges, factors or dequantization, a shard row written and read back).
The row's values are compared with what the reference computes: peft's own merge for PEFT and
diffusers LoRAs, kohya's `up @ down * alpha / rank`, torch's or ml_dtypes' decode of a dtype,
transformers' dequantization. Refusals are recorded with the status and reason the product stores.

The HTTP figures serve a sparse sharded checkpoint of several GB (3 shards of ~2 GiB, written with
seek so they take ~32 MiB of disk) and a single-file model through the loopback Hub test server
(tests/hubserver.py), and count what the reader and the server each saw.

    .venv/bin/python scripts/benchmark.py formats   # writes docs/bench/formats.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

# Values read agree with the reference when max |ours - ref| <= REL_TOL * max(1, max |ref|).
REL_TOL = 1e-5
LLM_LAYER = "model.layers.0.self_attn.q_proj.weight"

Log = Callable[[str], None]


# --- one row of the table ----------------------------------------------------------------------

def _values(row) -> np.ndarray:
    """A shard row's matrix as float64: the layer itself, or a LoRA row's `scale * B @ A`."""
    if row.kind == "lora":
        return row.scale * (row.B.astype(np.float64) @ row.A.astype(np.float64))
    return row.X.astype(np.float64)


def _how(res, rows: dict) -> str:
    """The status column: the extraction's status and how the rows were obtained."""
    if res.status != "ok":
        return res.status
    kinds = sorted({r.kind for r in rows.values()})
    extra = ""
    if kinds == ["lora"]:
        scales = sorted({round(float(r.scale), 6) for r in rows.values()})
        extra = f", scales {', '.join(f'{s:g}' for s in scales)}"
    return f"ok ({'/'.join(kinds)}, {len(rows)} layer{'s' * (len(rows) > 1)}{extra})"


def measured(fmt: str, reference: str, res, rows: dict, refs: dict[str, np.ndarray]) -> dict:
    """A format that is read: the largest difference from the reference over its layers."""
    if res.status != "ok" or set(rows) != set(refs):
        return {"format": fmt, "reference": reference, "status": _how(res, rows), "reason": res.reason,
                "max_abs_error": None, "ref_max_abs": None, "met": False}
    err = max(float(np.abs(_values(rows[k]) - refs[k].astype(np.float64).reshape(rows[k].shape)).max()) for k in refs)
    ref_max = max(float(np.abs(v).max()) for v in refs.values())
    return {"format": fmt, "reference": reference, "status": _how(res, rows), "reason": None,
            "max_abs_error": err, "ref_max_abs": ref_max, "met": err <= REL_TOL * max(1.0, ref_max)}


def refused(fmt: str, reference: str, status: str, reason: str | None, expect: str, extra_ok: bool = True) -> dict:
    """A format the product refuses: met when it is refused with the expected reason code."""
    return {"format": fmt, "reference": reference, "status": status, "reason": reason, "max_abs_error": None,
            "ref_max_abs": None, "expected_reason": expect,
            "met": status != "ok" and (reason or "").startswith(expect) and extra_ok}


# --- checkpoints ---------------------------------------------------------------------------------

TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}


def dtype_rows(work: Path) -> list[dict]:
    """Each float dtype torch writes, decoded against torch's own `.float()` of the stored tensor."""
    import torch
    from safetensors.torch import load_file
    from test_formats import extract, repo

    out = []
    for name, tdtype in TORCH_DTYPES.items():
        torch.manual_seed(0)
        stored = (torch.randn(64, 48) * 4).to(getattr(torch, tdtype))
        opener = repo(work, f"dtype-{name}", {LLM_LAYER: stored})
        ref = load_file(str(Path(opener.folder) / "model.safetensors"))[LLM_LAYER].float().numpy()
        res, rows = extract(work, opener)
        out.append(measured(f"safetensors {name}", f"torch {tdtype} -> float32 (safetensors.torch)", res, rows,
                            {LLM_LAYER: ref}))
    return out


def subbyte_rows(work: Path) -> list[dict]:
    """FP4 as torch packs it (float4_e2m1fn_x2, first element in the low nibble) and FP6 packed as
    a little-endian bit stream (the safetensors parser accepts it; torch has no FP6), against
    ml_dtypes' value of each code."""
    import torch
    from test_formats import extract, repo
    from test_safetensors_reader import pack_bits, write_raw

    from storage.sources import LocalOpener

    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (64, 48), dtype=np.uint8)
    packed = torch.from_numpy(codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.float4_e2m1fn_x2)
    res, rows = extract(work, repo(work, "dtype-F4", {LLM_LAYER: packed}))
    out = [measured("safetensors F4 (E2M1, 2 per byte)", "ml_dtypes float4_e2m1fn of each code (file by torch)",
                    res, rows, {LLM_LAYER: codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)})]
    for name, dtype in (("F6_E2M3", ml_dtypes.float6_e2m3fn), ("F6_E3M2", ml_dtypes.float6_e3m2fn)):
        codes = rng.integers(0, 64, (64, 48), dtype=np.uint8)
        data = pack_bits(codes, 6)
        folder = work / f"dtype-{name}"
        folder.mkdir()
        write_raw(folder / "model.safetensors", {LLM_LAYER: {"dtype": name, "shape": [64, 48],
                                                             "data_offsets": [0, len(data)]}}, data)
        res, rows = extract(work, LocalOpener(f"org/{name}", "0" * 40, str(folder)))
        out.append(measured(f"safetensors {name} (4 per 3 bytes)", f"ml_dtypes {dtype.__name__} of each code "
                            "(packed bit by bit)", res, rows, {LLM_LAYER: codes.view(dtype).astype(np.float32)}))
    return out


def layout_rows(work: Path) -> list[dict]:
    """A sharded checkpoint through model.safetensors.index.json and a diffusers pipeline folder
    (model_index.json, unet/diffusion_pytorch_model.safetensors), against safetensors' own load."""
    import torch
    from safetensors.torch import load_file, save_file
    from test_adapters import UNET_MODULES, unet
    from test_formats import extract

    from storage.sources import LocalOpener

    d = work / "sharded"
    d.mkdir()
    torch.manual_seed(3)
    shards = {"model-00001-of-00002.safetensors": {"model.embed_tokens.weight": torch.randn(32, 16).bfloat16()},
              "model-00002-of-00002.safetensors": {LLM_LAYER: torch.randn(16, 16).bfloat16()}}
    for f, tensors in shards.items():
        save_file(tensors, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, t in shards.items() for k in t}}))
    res, rows = extract(work, LocalOpener("org/sharded", "0" * 40, str(d)))
    ref = load_file(str(d / "model-00002-of-00002.safetensors"))[LLM_LAYER].float().numpy()
    out = [measured("sharded BF16 (model.safetensors.index.json)", "safetensors.torch.load_file of the shard",
                    res, rows, {LLM_LAYER: ref})]

    d = work / "diffusers-root"
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                    "unet": ["diffusers", "UNet2DConditionModel"]}))
    save_file({k: v.contiguous() for k, v in unet().state_dict().items()}, str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    layers = [f"{m}.weight" for m in UNET_MODULES]
    res, rows = extract(work, LocalOpener("org/sd-root", "0" * 40, str(d)), layers=layers)
    ref = load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    out.append(measured("diffusers folder (model_index.json + unet/)", "safetensors.torch.load_file of "
                        "unet/diffusion_pytorch_model.safetensors", res, rows,
                        {k: ref[k].numpy().reshape(ref[k].shape[0], -1) for k in layers}))
    return out


# --- adapters ------------------------------------------------------------------------------------

PEFT_CASES = {"plain": "PEFT LoRA (linear, conv, embedding)", "rslora": "PEFT rsLoRA (alpha / sqrt r)",
              "patterns": "PEFT LoRA, rank_pattern + alpha_pattern",
              "rslora_patterns": "PEFT rsLoRA, rank_pattern + alpha_pattern"}


def peft_rows(work: Path) -> list[dict]:
    """PEFT adapters saved by peft (linear, conv, embedding modules), against peft's
    merge_and_unload; DoRA as peft saves it, which the product refuses."""
    from test_adapters import CONFIGS, build_and_save
    from test_formats import extract

    from storage.safetensors_reader import as_matrix
    from storage.sources import LocalOpener

    out = []
    for case, title in PEFT_CASES.items():
        d = work / f"peft-{case}"
        deltas, _ = build_and_save(d, CONFIGS[case])
        refs = {f"{m}.weight": as_matrix(v) for m, v in deltas.items()}
        res, rows = extract(work, LocalOpener(f"org/peft-{case}", "0" * 40, str(d)), layers=tuple(refs))
        out.append(measured(title, "peft merge_and_unload (W_merged - W)", res, rows, refs))
    d = work / "peft-dora"
    deltas, _ = build_and_save(d, dict(r=4, lora_alpha=8, use_dora=True))
    res, _ = extract(work, LocalOpener("org/peft-dora", "0" * 40, str(d)), layers=tuple(f"{m}.weight" for m in deltas))
    out.append(refused("PEFT DoRA (use_dora)", "peft (saved by get_peft_model + save_pretrained)", res.status,
                       res.reason, "dora_unsupported"))
    return out


def diffusers_lora_rows(work: Path) -> list[dict]:
    """diffusers LoRA files (pytorch_lora_weights.safetensors, `unet.` keys): scale from the
    `lora_adapter_metadata` LoraConfig, else 1.0; against peft's merge of the same adapter."""
    from peft import LoraConfig
    from test_adapters import UNET_MODULES, diffusers_lora
    from test_formats import extract

    from storage.safetensors_reader import as_matrix
    from storage.sources import LocalOpener

    targets = ["to_k", "to_out.0", "conv1"]
    cases = [
        ("diffusers LoRA, LoraConfig in metadata (alpha 12, rank_pattern)", "meta",
         LoraConfig(r=4, lora_alpha=12, target_modules=targets, rank_pattern={"conv1": 2}), True, None),
        ("diffusers LoRA, no metadata (scale 1.0)", "nometa", LoraConfig(r=4, lora_alpha=4, target_modules=targets),
         False, None),
        ("diffusers LoRA, old `.lora.down/.lora.up` keys", "old", LoraConfig(r=4, lora_alpha=4, target_modules=targets),
         False, lambda k: k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")),
    ]
    out = []
    for title, slug, cfg, metadata, rename in cases:
        d = work / f"diffusers-lora-{slug}"
        d.mkdir()
        deltas = diffusers_lora(d, cfg, metadata=metadata, rename=rename)
        refs = {f"{m}.weight": as_matrix(deltas[m]) for m in UNET_MODULES}
        res, rows = extract(work, LocalOpener(f"org/dl-{slug}", "0" * 40, str(d)), layers=tuple(refs))
        out.append(measured(title, "peft merge of the injected adapter (as diffusers loads it)", res, rows, refs))
    return out


def kohya_rows(work: Path) -> list[dict]:
    """A kohya-ss LoRA (lora_unet_<module>, lora_down / lora_up / alpha; alpha absent or 0 means
    rank), module names mapped to the root's, against kohya's merge `up @ down * alpha / rank`."""
    from test_adapters import UNET_MODULES, kohya_file
    from test_formats import extract

    from storage.sources import LocalOpener

    d = work / "kohya"
    d.mkdir()
    deltas = kohya_file(d / "style_v1.safetensors", {UNET_MODULES[0]: 1.0, UNET_MODULES[1]: None, UNET_MODULES[2]: 0.0})
    refs = {f"{m}.weight": v for m, v in deltas.items()}
    res, rows = extract(work, LocalOpener("org/kohya", "0" * 40, str(d)), layers=tuple(refs))
    return [measured("kohya LoRA (alpha / rank; no alpha or 0: 1.0)", "kohya sd-scripts merge up @ down * alpha / "
                     "rank (torch)", res, rows, refs)]


def lycoris_rows(work: Path) -> list[dict]:
    """LyCORIS LoHa and LoKr files, which are not a product of two factors: refused by kind."""
    import torch
    from safetensors.torch import save_file
    from test_adapters import UNET_MODULES
    from test_formats import extract

    from storage.sources import LocalOpener

    key = "lora_unet_" + UNET_MODULES[0].replace(".", "_")
    out = []
    for kind, keys in (("LoHa", ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"]),
                       ("LoKr", ["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"])):
        d = work / f"lycoris-{kind}"
        d.mkdir()
        save_file({f"{key}.{k}": torch.ones(2, 2) if k != "alpha" else torch.tensor(1.0) for k in keys},
                  str(d / f"{kind.lower()}.safetensors"))
        res, _ = extract(work, LocalOpener(f"org/{kind}", "0" * 40, str(d)), layers=(f"{UNET_MODULES[0]}.weight",))
        out.append(refused(f"LyCORIS {kind}", f"LyCORIS {kind} key names ({', '.join(keys)})", res.status, res.reason,
                           f"lycoris_{kind.lower()}_unsupported"))
    return out


# --- quantized copies ------------------------------------------------------------------------------

CT_CONFIG = {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}


def fp8_rows(work: Path) -> list[dict]:
    """FP8 copies: compressed-tensors per tensor and per channel (transformers' per-row
    quantizer), and fine-grained block scales (transformers' Fp8Quantize / Fp8Dequantize)."""
    from types import SimpleNamespace

    import torch
    from test_formats import extract, repo
    from transformers.integrations.compressed_tensors import quantize_fp8_per_row
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    module = LLM_LAYER.removesuffix(".weight")
    torch.manual_seed(4)
    w = torch.randn(64, 128)
    s_t = (w.abs().max() / torch.finfo(torch.float8_e4m3fn).max).reshape(1)
    q_t = (w / s_t).to(torch.float8_e4m3fn)
    q_c, s_c = quantize_fp8_per_row(w)
    s_c = s_c.unsqueeze(1)  # compressed-tensors stores channel scales as [out, 1]
    out = []
    for title, q, s, ref in (("FP8 E4M3, per-tensor scale (compressed-tensors)", q_t, s_t, "q.float() * s (torch)"),
                             ("FP8 E4M3, per-channel scale (compressed-tensors)", q_c, s_c,
                              "transformers quantize_fp8_per_row; q.float() * s (torch)")):
        s = s.to(torch.bfloat16)  # stored in the model's dtype
        tensors = {LLM_LAYER: q, f"{module}.weight_scale": s, f"{module}.input_scale": torch.ones(1)}
        res, rows = extract(work, repo(work, f"fp8-{title.split(', ')[1].split()[0]}", tensors, CT_CONFIG))
        out.append(measured(title, ref, res, rows, {LLM_LAYER: (q.float() * s.float()).numpy()}))
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[16, 32], scale_fmt=None))
    stored = Fp8Quantize(quantizer).convert({LLM_LAYER: w, "model.norm.weight": torch.ones(128)})
    ref = Fp8Dequantize(quantizer).convert({"weight": stored[LLM_LAYER], "weight_scale_inv": stored[f"{module}.weight_scale_inv"]},
                                           model=None)["weight"].float().numpy()
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 32], "fmt": "e4m3"}}
    res, rows = extract(work, repo(work, "fp8-block", stored, config))
    out.append(measured("FP8 E4M3, 16x32 block scales (fine-grained, weight_scale_inv)",
                        "transformers Fp8Quantize / Fp8Dequantize", res, rows, {LLM_LAYER: ref}))
    return out


def packing_rows(work: Path) -> list[dict]:
    """Integer packings (GPTQ, AWQ, bitsandbytes NF4 and int8) in their libraries' tensor layouts:
    refused with the method named, from the names alone."""
    from test_formats import bnb4_tensors, bnb8_tensors, extract, gptq_tensors, repo

    cases = [("GPTQ 4-bit (qweight/qzeros/scales/g_idx)", "gptq", gptq_tensors(),
              {"quant_method": "gptq", "bits": 4, "group_size": 32}, "quantized_gptq"),
             ("AWQ 4-bit (qweight/qzeros/scales)", "awq", gptq_tensors(),
              {"quant_method": "awq", "bits": 4, "group_size": 32}, "quantized_awq"),
             ("bitsandbytes NF4", "nf4", bnb4_tensors(),
              {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "quantized_bitsandbytes"),
             ("bitsandbytes int8 (LLM.int8, SCB)", "int8", bnb8_tensors(),
              {"quant_method": "bitsandbytes", "load_in_8bit": True}, "quantized_bitsandbytes")]
    out = []
    for title, slug, tensors, qc, expect in cases:
        res, _ = extract(work, repo(work, f"q-{slug}", tensors, {"quantization_config": qc}))
        out.append(refused(title, "AutoGPTQ / AutoAWQ / bitsandbytes tensor layout", res.status, res.reason, expect))
    return out


def unreadable_rows(work: Path) -> list[dict]:
    """A dtype the reader does not know (refused for that tensor only), and repos with only a
    pickle or only GGUF, recorded by the crawl with a reason and never opened."""
    import pickle

    from minilake import T0, card, write_repo
    from test_formats import Trap, extract

    from storage.sources import LocalOpener, LocalSource

    d = work / "future-dtype"
    d.mkdir()
    blob = json.dumps({LLM_LAYER: {"dtype": "F2_E1M0", "shape": [4, 4], "data_offsets": [0, 4]}}).encode()
    (d / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(4))
    res, _ = extract(work, LocalOpener("org/future", "0" * 40, str(d)))
    out = [refused("unknown dtype (F2_E1M0)", "safetensors header", res.status, res.reason, "unsupported_dtype")]

    lake, marker = work / "lake-unreadable", work / "unpickled"
    front = card("base_model: org/root\nbase_model_relation: finetune\nlabels: [cat]")
    write_repo(lake, "org/pickle-only", {"README.md": front, "pytorch_model.bin": pickle.dumps(Trap(str(marker)))}, t=T0)
    write_repo(lake, "org/gguf-only", {"README.md": front, "model-Q4_K_M.gguf": b"GGUF\3"}, t=T0 + 60)
    recs = {r.repo_id: r for r in LocalSource(lake).list_models()}
    p, g = recs["org/pickle-only"], recs["org/gguf-only"]
    out.append(refused("pickle only (pytorch_model.bin)", "crawl record (the pickle is never loaded)", p.status,
                       p.reason, "only pytorch_model.bin (pickle)", extra_ok=not marker.exists()))
    out[-1]["pickle_loaded"] = marker.exists()
    out.append(refused("GGUF only", "crawl record", g.status, g.reason, "only GGUF"))
    return out


def format_table(work: Path, log: Log) -> list[dict]:
    """Every row of the per-format table, each built in its own folder under `work`."""
    rows = []
    for part in (dtype_rows, subbyte_rows, layout_rows, peft_rows, diffusers_lora_rows, kohya_rows, lycoris_rows,
                 fp8_rows, packing_rows, unreadable_rows):
        sub = work / part.__name__
        sub.mkdir(parents=True)
        rows += part(sub)
        log(f"[bench] formats: {part.__name__} done")
    return rows


# --- bytes and requests over HTTP ---------------------------------------------------------------

SHARDS = 3
LAYERS_PER_SHARD = 5
HIDDEN, FFN = 4096, 11008  # a 7B Llama's attention and MLP sizes: ~2 GiB of BF16 per 5 layers
TARGET = "model.layers.7.self_attn.q_proj.weight"  # in the middle shard


def _llama_tensors(layer: int) -> dict[str, list[int]]:
    p = f"model.layers.{layer}."
    shapes = {f"{p}self_attn.{n}_proj.weight": [HIDDEN, HIDDEN] for n in "qkvo"}
    shapes.update({f"{p}mlp.gate_proj.weight": [FFN, HIDDEN], f"{p}mlp.up_proj.weight": [FFN, HIDDEN],
                   f"{p}mlp.down_proj.weight": [HIDDEN, FFN], f"{p}input_layernorm.weight": [HIDDEN],
                   f"{p}post_attention_layernorm.weight": [HIDDEN]})
    return shapes


DTYPE_BYTES = {"F32": 4, "BF16": 2}


def sparse_safetensors(path: Path, shapes: dict[str, list[int]], data: dict[str, bytes], dtype: str = "BF16") -> dict:
    """A safetensors file of `dtype` tensors at their full size whose bytes are holes except
    `data`'s tensors: a checkpoint of many GB that takes only those bytes on disk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = DTYPE_BYTES[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, raw in data.items():
            f.seek(start + header[name]["data_offsets"][0])
            f.write(raw)
        f.truncate(start + offset)
    return {"file_bytes": start + offset, "header_bytes": start}


def sharded_checkpoint(folder: Path) -> tuple[dict, np.ndarray]:
    """3 sparse shards of ~2 GiB and their index; the target layer's values are real."""
    folder.mkdir(parents=True)
    target = np.random.default_rng(5).standard_normal((HIDDEN, HIDDEN)).astype(ml_dtypes.bfloat16)
    shards, weight_map = {}, {}
    for s in range(SHARDS):
        fname = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        shapes = {}
        for layer in range(s * LAYERS_PER_SHARD, (s + 1) * LAYERS_PER_SHARD):
            shapes.update(_llama_tensors(layer))
        data = {TARGET: target.tobytes()} if TARGET in shapes else {}
        shards[fname] = sparse_safetensors(folder / fname, shapes, data) | {"tensors": len(shapes)}
        weight_map.update(dict.fromkeys(shapes, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return shards, target.astype(np.float32)


def single_file_model(folder: Path) -> np.ndarray:
    """A small single-file BF16 model; returns its q_proj values."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(6)
    tensors = {f"model.layers.{i}.self_attn.{n}_proj.weight": torch.randn(256, 256).bfloat16() for i in range(2) for n in "qkvo"}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return tensors[LLM_LAYER].float().numpy()


def _served(hub, repo_id: str, hits_before: int, bytes_before: dict) -> tuple[int, int, list[str]]:
    """(resolve requests, body bytes, files asked for) the server answered for `repo_id` since the marks."""
    prefix = f"/{repo_id}/resolve/"
    hits = [h for h in hub.traffic.hits[hits_before:] if h.path.startswith(prefix)]
    served = sum(v - bytes_before.get(p, 0) for p, v in hub.traffic.body_bytes.items() if p.startswith(prefix))
    files = sorted({h.path.split("/", 5)[-1] for h in hits})  # /org/name/resolve/<sha>/<file>
    return len(hits), served, files


def _extract_over_http(hub, src, repo_id: str, layer: str, shards_root: Path):
    """One model's layer through HubSource's opener and extract_model, with the server's counts."""
    from storage.extract import ExtractJob, extract_model
    from storage.shards import read_layer

    rec = src.model_info(repo_id)
    job = ExtractJob(src.opener(rec.repo_id, rec.sha), "bench/root", tuple(f.path for f in rec.files), (layer,),
                     str(shards_root))
    hits_before, bytes_before = len(hub.traffic.hits), dict(hub.traffic.body_bytes)
    res = extract_model(job)
    requests, served, files = _served(hub, repo_id, hits_before, bytes_before)
    rows = read_layer(shards_root, "bench/root", layer, {repo_id}) if res.status == "ok" else []
    return res, requests, served, files, (rows[0] if rows else None)


def http_figures(work: Path, log: Log) -> dict:
    """Bytes for one 4096x4096 BF16 layer of a 3-shard checkpoint of several GB, and requests per
    model for a single-file model, through the loopback Hub server."""
    from hubserver import HubServer

    from storage.sources import HubSource

    lake = work / "lake"
    shards, target = sharded_checkpoint(lake / "bench" / "sharded-llm")
    small = single_file_model(lake / "bench" / "single-file")
    log("[bench] formats: sparse sharded checkpoint written")
    with HubServer(lake) as hub:
        src = HubSource(endpoint=hub.url, token=None)
        res, requests, served, files, row = _extract_over_http(hub, src, "bench/sharded-llm", TARGET, work / "shards")
        res1, requests1, served1, _, row1 = _extract_over_http(hub, src, "bench/single-file", LLM_LAYER, work / "shards")
    layer_bytes = 2 * HIDDEN * HIDDEN
    touched = [f for f in files if f in shards]  # the shards the server was asked for
    headers = sum(shards[f]["header_bytes"] for f in touched)
    bound = 1.1 * layer_bytes + headers
    index_bytes = (lake / "bench" / "sharded-llm" / "model.safetensors.index.json").stat().st_size
    sharded = {"checkpoint_bytes": sum(s["file_bytes"] for s in shards.values()), "shards": shards,
               "disk_bytes": sum((lake / "bench" / "sharded-llm" / f).stat().st_blocks * 512 for f in shards),
               "layer": TARGET, "layer_bytes": layer_bytes, "shards_touched": touched,
               "header_bytes_touched": headers, "index_bytes": index_bytes, "status": res.status, "reason": res.reason,
               "bytes_read": res.bytes_read, "bytes_needed": res.bytes_needed, "server_bytes_served": served,
               "bound_bytes": bound, "bound_holds": res.bytes_read <= bound and served <= bound,
               "requests_server": requests, "requests_client": res.hub.requests, "seconds": res.seconds,
               "values_equal": row is not None and bool(np.array_equal(row.X, target))}
    single = {"file_bytes": (lake / "bench" / "single-file" / "model.safetensors").stat().st_size, "layer": LLM_LAYER,
              "layer_shape": list(small.shape), "layer_dtype": row1.dtype if row1 else None,
              "status": res1.status, "reason": res1.reason, "bytes_read": res1.bytes_read,
              "server_bytes_served": served1, "requests_server": requests1, "requests_client": res1.hub.requests,
              "target_requests": 3, "met": res1.status == "ok" and requests1 <= 3,
              "values_equal": row1 is not None and bool(np.array_equal(row1.X, small))}
    return {"sharded": sharded, "single_file": single}


def bench(bench_dir: Path, log: Log = lambda m: None) -> dict:
    """The table and the HTTP figures, in a temporary folder under `bench_dir` removed after."""
    bench_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="formats-", dir=bench_dir))
    try:
        table = format_table(work / "table", log)
        http = http_figures(work / "http", log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rel_tol": REL_TOL, "table": table, "http": http}


if __name__ == "__main__":
    print(json.dumps(bench(Path(tempfile.gettempdir()) / "probex-bench", log=lambda m: print(m, file=sys.stderr)),
                      indent=2, default=str))
