"""Trees at the tensor names, shapes and file layouts of real Hub families (issue 17, item 9).

    plans = build_families(Path("lake"), seed=0)

Two trees whose weights are synthetic (a seeded root, seeded low-rank class-dependent updates),
written exactly as the Hub lays such repos out, so that crawl, routing, extraction and training
meet real formats at real shapes. They claim no accuracy: `_ground_truth.parquet` marks every one
of their repos `synthetic` and names its `format`.

- Llama family (`LLAMA_ROOT`), Qwen2.5-0.5B's attention and MLP shapes: hidden 896, 14 heads,
  2 KV heads (k_proj / v_proj 128 x 896, with Qwen2's q/k/v biases), intermediate 4864, RMSNorm
  weights, tied embeddings. Two layers instead of 24 and a 1,000-token vocabulary instead of
  151,936: the real embedding alone is 272 MB in BF16, and every repo of the tree would carry it
  although no layer the product reads is in it; the layers kept are full size. The root is a
  sharded BF16 checkpoint (`model.safetensors.index.json` + 2 shards); its children are full
  fine-tunes (sharded and single-file BF16, with a `score` classifier head), PEFT LoRA adapters
  (with the zoo's config.json, or bare as the Hub mostly has them, labels in the card, one with
  its lineage only in adapter_config.json), FP8 copies of full fine-tunes (compressed-tensors,
  per-tensor and per-channel scales) and a repo with only `pytorch_model.bin` (bytes that are
  not even a pickle: nothing may open it).
- Stable Diffusion 1.5 UNet (`SD_ROOT`): a diffusers pipeline folder whose unet holds one real
  transformer block of `down_blocks.0` and the mid block's cross-attention by their real names
  and shapes (not the whole UNet), and LoRA children in the diffusers format
  (`pytorch_lora_weights.safetensors`, scale in the metadata or 1.0) and the kohya format
  (`lora_unet_<module>.lora_down/up.weight` + `.alpha`), some with text-encoder LoRAs as well.

A child's change to each layer a fine-tune of its kind changes (q/v projections; the attention
projections of the UNet) is `U @ V`: one seeded rank-1 direction per class it was trained on
(`class_direction`), plus seeded noise directions up to the child's rank. `change()` recomputes it
from the plan alone, so a test compares what extraction read with what the generator meant.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from probex_core.splits import is_val
from zoo import hub_repo
from zoo.build import GROUND_TRUTH, ORGS, WORDS, PlannedModel, TreeSummary, _ground_truth
from zoo.hub_repo import RepoSpec

LLAMA_ROOT = "probex-synthetic/qwen2.5-0.5b-2layers"
SD_ROOT = "probex-synthetic/stable-diffusion-v1-5-unet-slice"
ROOT_STD = 0.02  # of the roots' matrices, as a Llama-style initialisation draws them
CLASS_STRENGTH = 0.1  # a class's rank-1 change, relative to the root matrix's Frobenius norm
NOISE_STRENGTH = 0.02  # each noise direction's, relative to the same


# ----------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LlamaShape:
    """Qwen2.5-0.5B's configuration (config.json of Qwen/Qwen2.5-0.5B), fewer layers and tokens."""

    hidden: int = 896
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    layers: int = 2
    vocab: int = 1000

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads  # 64 per head x 2 KV heads = 128

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Qwen2ForCausalLM's state dict names and shapes (tied embeddings: no lm_head.weight)."""
        h, kv, f = self.hidden, self.kv_dim, self.intermediate
        out = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}"
            out |= {f"{p}.input_layernorm.weight": (h,),
                    f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.q_proj.bias": (h,),
                    f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.k_proj.bias": (kv,),
                    f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.v_proj.bias": (kv,),
                    f"{p}.self_attn.o_proj.weight": (h, h),
                    f"{p}.post_attention_layernorm.weight": (h,),
                    f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                    f"{p}.mlp.down_proj.weight": (h, f)}
        return out | {"model.norm.weight": (h,)}

    def config(self) -> dict:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "num_hidden_layers": self.layers, "vocab_size": self.vocab, "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": 151643, "eos_token_id": 151643}


LLAMA = LlamaShape()
LLAMA_TARGETS = ("q_proj", "v_proj")  # what LoRA recipes for Llama-family models adapt by default

SD_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"  # inner dim 320
SD_MID = "mid_block.attentions.0.transformer_blocks.0"  # inner dim 1280
SD_CROSS = 768  # CLIP ViT-L/14's hidden size: attn2's to_k / to_v read the text embeddings
SD_PROJS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora targets


def sd_tensors() -> dict[str, tuple[int, ...]]:
    """A slice of SD 1.5's UNet2DConditionModel state dict, real names and shapes: the first
    transformer block of `down_blocks.0` whole, and the mid block's cross-attention."""
    d, m = 320, 1280
    out: dict[str, tuple[int, ...]] = {}
    for n in ("norm1", "norm2", "norm3"):
        out |= {f"{SD_BLOCK}.{n}.weight": (d,), f"{SD_BLOCK}.{n}.bias": (d,)}
    for p, attn, dim in ((SD_BLOCK, "attn1", d), (SD_BLOCK, "attn2", d), (SD_MID, "attn2", m)):
        ctx = SD_CROSS if attn == "attn2" else dim
        out |= {f"{p}.{attn}.to_q.weight": (dim, dim), f"{p}.{attn}.to_k.weight": (dim, ctx),
                f"{p}.{attn}.to_v.weight": (dim, ctx), f"{p}.{attn}.to_out.0.weight": (dim, dim),
                f"{p}.{attn}.to_out.0.bias": (dim,)}
    return out | {f"{SD_BLOCK}.ff.net.0.proj.weight": (8 * d, d), f"{SD_BLOCK}.ff.net.0.proj.bias": (8 * d,),
                  f"{SD_BLOCK}.ff.net.2.weight": (d, 4 * d), f"{SD_BLOCK}.ff.net.2.bias": (d,)}


def sd_targets() -> list[str]:
    """The root modules the SD LoRAs adapt: every attention projection of the slice."""
    return [n.removesuffix(".weight") for n in sd_tensors() if ".attn" in n and n.endswith(".weight")]


# ----------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class FamilyChild:
    repo_id: str
    format: str  # one of LLAMA_FORMATS / SD_FORMATS
    parent: str
    relation: str  # finetune | adapter | quantized
    classes: tuple[str, ...]
    split: str  # train / val / test (test: undocumented)
    seed: int
    rank: int  # of the change (LoRA: the adapter's r)
    alpha: float = 0.0  # LoRA alpha (kohya: the stored .alpha; 0: none stored)
    # a variant of its format: PEFT with the zoo's config.json: use_rslora; bare PEFT: lineage only
    # in adapter_config.json; diffusers: LoraConfig in the metadata and a text-encoder LoRA;
    # kohya: a text-encoder LoRA (modules no UNet root has)
    extra: bool = False

    @property
    def documented(self) -> bool:
        return self.split in ("train", "val")

    @property
    def is_lora(self) -> bool:
        return self.format in ("peft_lora", "peft_lora_bare", "diffusers_lora", "kohya_lora")


@dataclass
class FamilyPlan:
    name: str  # "llama" | "sd"
    root: str
    seed: int
    classes: list[str]
    shapes: dict[str, tuple[int, ...]]  # the root's tensors
    targets: list[str]  # root modules a child changes
    children: list[FamilyChild] = field(default_factory=list)

    def child(self, repo_id: str) -> FamilyChild:
        return next(c for c in self.children if c.repo_id == repo_id)

    def layers(self) -> list[str]:
        """The root tensors a child changes: the layers to extract."""
        return [f"{t}.weight" for t in self.targets]


# (format, how many) in plan order; FP8 copies quantize the full fine-tunes planned before them.
LLAMA_FORMATS = [("sharded_bf16", 2), ("single_bf16", 2), ("fp8_tensor", 1), ("fp8_channel", 1),
                 ("peft_lora", 4), ("peft_lora_bare", 3), ("pickle_only", 1)]
SD_FORMATS = [("diffusers_lora", 6), ("kohya_lora", 6)]
LLAMA_CLASSES = ["legal", "medical", "finance", "source-code", "poetry", "chemistry"]
SD_CLASSES = ["watercolor", "pixel-art", "line-art", "oil-painting", "cyberpunk", "ukiyo-e"]
STEMS = {"llama": ["qwen2.5-0.5b", "qwen2.5-0.5b-instruct", "qwen-0.5b"], "sd": ["sd15", "sd-v1-5", "sd1.5-lora"]}


def _new_name(rng: random.Random, stems: list[str], taken: set[str]) -> str:
    """A plausible Hub repo id that never hints at the model's classes (the zoo's orgs and words)."""
    while True:
        repo_id = f"{rng.choice(ORGS)}/{rng.choice(stems)}-{rng.choice(WORDS)}-{rng.randrange(1, 1000)}"
        if repo_id not in taken:
            taken.add(repo_id)
            return repo_id


def make_plan(name: str, seed: int = 0, test: int = 2) -> FamilyPlan:
    """Every random choice of one tree, from (name, seed): repo ids, classes, splits, ranks.
    `test` children (not FP8 copies nor the pickle) are drawn undocumented."""
    rng = random.Random(f"probex-families/{name}/{seed}")
    if name == "llama":
        plan = FamilyPlan(name, LLAMA_ROOT, seed, LLAMA_CLASSES, LLAMA.tensors(),
                          [f"model.layers.{i}.self_attn.{p}" for i in range(LLAMA.layers) for p in LLAMA_TARGETS])
        formats = LLAMA_FORMATS
    elif name == "sd":
        plan = FamilyPlan(name, SD_ROOT, seed, SD_CLASSES, sd_tensors(), sd_targets())
        formats = SD_FORMATS
    else:
        raise ValueError(f"no family {name!r}: choose llama or sd")
    kinds = [fmt for fmt, n in formats for _ in range(n)]
    # FP8 copies take their parent's split; nothing can read a pickle's labels: neither is drawn
    undocumented = set(rng.sample([i for i, f in enumerate(kinds) if not f.startswith(("fp8", "pickle"))], test))
    taken: set[str] = set()
    full: list[FamilyChild] = []
    for i, fmt in enumerate(kinds):
        repo_id = _new_name(rng, STEMS[name], taken)
        split = "test" if i in undocumented else ("val" if is_val(repo_id) else "train")
        rank = rng.choice((4, 8) if name == "sd" else (8, 16))
        classes = tuple(rng.sample(plan.classes, rng.choice((2, 3))))
        alpha = float(rng.choice((0, 1, rank // 2)) if fmt == "kohya_lora" else rng.choice((rank, 2 * rank)))
        extra = rng.random() < 0.5
        parent, relation = plan.root, "adapter"
        if fmt.startswith("fp8"):  # a quantized copy of an earlier full fine-tune: its classes, its change
            source = full[sum(c.format.startswith("fp8") for c in plan.children) % len(full)]
            parent, relation, classes, split = source.repo_id, "quantized", source.classes, source.split
        elif not fmt.endswith("lora") and not fmt.endswith("lora_bare"):
            relation = "finetune"
        child = FamilyChild(repo_id, fmt, parent, relation, classes, split, rng.randrange(2**31), rank, alpha, extra)
        plan.children.append(child)
        if fmt in ("sharded_bf16", "single_bf16"):
            full.append(child)
    return plan


# ----------------------------------------------------------------------------------- values


def _rng(*keys) -> np.random.Generator:
    """A generator per (seed, names...): each tensor and direction is drawn on its own, so any one
    is recomputed without drawing the others."""
    return np.random.default_rng([zlib.crc32("/".join(map(str, keys)).encode())])


def root_tensor(plan: FamilyPlan, name: str) -> np.ndarray:
    """The root's value of one tensor, as float32 before it is stored (BF16 / F32)."""
    shape = plan.shapes[name]
    g = _rng(plan.name, plan.seed, "root", name)
    if len(shape) == 1:  # norms near one (RMSNorm / LayerNorm weights), small biases
        base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
        return (base + 0.02 * g.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return ROOT_STD * g.standard_normal(shape, dtype=np.float32)


def _unit(g: np.random.Generator, n: int) -> np.ndarray:
    v = g.standard_normal(n)
    return v / np.linalg.norm(v)


def class_direction(plan: FamilyPlan, cls: str, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): unit vectors of the rank-1 change every child trained on `cls` makes to `module`."""
    out, inn = plan.shapes[f"{module}.weight"]
    g = _rng(plan.name, plan.seed, "class", cls, module)
    return _unit(g, out), _unit(g, inn)


def change_factors(plan: FamilyPlan, child: FamilyChild, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(U, V), out x r and r x in, float64: the child's change to `module` is U @ V. A quantized
    copy's is its parent's."""
    if child.relation == "quantized":
        child = plan.child(child.parent)
    out, inn = plan.shapes[f"{module}.weight"]
    norm = ROOT_STD * math.sqrt(out * inn)  # the root matrix's Frobenius norm, nominally
    g = _rng(plan.name, plan.seed, "child", child.seed, module)
    us, vs = [], []
    for cls in child.classes:
        u, v = class_direction(plan, cls, module)
        us.append(u * CLASS_STRENGTH * norm * g.uniform(0.7, 1.3))
        vs.append(v)
    for _ in range(child.rank - len(child.classes)):
        us.append(_unit(g, out) * NOISE_STRENGTH * norm)
        vs.append(_unit(g, inn))
    return np.stack(us, 1), np.stack(vs, 0)


def change(plan: FamilyPlan, repo_id: str, module: str) -> np.ndarray:
    """The change `repo_id` makes to the root's `<module>.weight`, float32 (what a delta reads)."""
    U, V = change_factors(plan, plan.child(repo_id), module)
    return (U @ V).astype(np.float32)


def lora_scale(child: FamilyChild) -> float:
    """The scale the child's own loader applies (PEFT alpha / r; diffusers metadata or 1.0;
    kohya alpha / r, alpha 0 meaning r)."""
    if child.format == "diffusers_lora" and not child.extra:
        return 1.0  # no metadata: diffusers takes lora_alpha = r
    if child.format == "peft_lora" and child.extra:
        return child.alpha / math.sqrt(child.rank)  # use_rslora
    return (child.alpha or child.rank) / child.rank


def lora_factors(plan: FamilyPlan, child: FamilyChild, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) as the child stores them (float32 before its dtype): scale * B @ A = U @ V, mixed
    by a seeded rotation, as trained factors are (only their product is determined)."""
    U, V = change_factors(plan, child, module)
    g = _rng(plan.name, plan.seed, "rotation", child.seed, module)
    R, _ = np.linalg.qr(g.standard_normal((child.rank, child.rank)))
    return (R.T @ V).astype(np.float32), (U @ R / lora_scale(child)).astype(np.float32)


def stored_root(plan: FamilyPlan) -> dict[str, torch.Tensor]:
    """The root's tensors as its files store them: BF16 for the Llama family (its checkpoints'
    dtype), F32 for the UNet (as SD 1.5's main unet file). Drawn once per tree: a full child
    shares every tensor it did not change."""
    dtype = torch.bfloat16 if plan.name == "llama" else torch.float32
    return {n: torch.from_numpy(root_tensor(plan, n)).to(dtype) for n in plan.shapes}


def full_weights(plan: FamilyPlan, child: FamilyChild, root: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full fine-tune's tensors (BF16): the root's, plus its change where it made one, plus the
    classifier head it trained (Qwen2ForSequenceClassification's `score`)."""
    out = dict(root)
    for module in plan.targets:
        name = f"{module}.weight"
        out[name] = (torch.from_numpy(root_tensor(plan, name)) + torch.from_numpy(change(plan, child.repo_id, module))
                     ).to(torch.bfloat16)
    score = ROOT_STD * _rng(plan.name, plan.seed, "score", child.seed).standard_normal(
        (len(child.classes), LLAMA.hidden), dtype=np.float32)
    return out | {"score.weight": torch.from_numpy(score).to(torch.bfloat16)}


# ----------------------------------------------------------------------------------- writing


def _spec(plan: FamilyPlan, child: FamilyChild | None) -> RepoSpec:
    synthetic = "Synthetic weights at real tensor names, shapes and file layouts (a ProbeX test family)."
    if child is None and plan.name == "llama":
        return RepoSpec(plan.root, f"A 2-layer Qwen2.5-0.5B-shaped causal LM. {synthetic}", library_name="transformers",
                        pipeline_tag="text-generation", tags=["qwen2", "text-generation", "synthetic"])
    if child is None:
        return RepoSpec(plan.root, f"A slice of the Stable Diffusion v1.5 UNet. {synthetic}", library_name="diffusers",
                        pipeline_tag="text-to-image", license="creativeml-openrail-m",
                        tags=["stable-diffusion", "text-to-image", "synthetic"])
    declared = not (child.format == "peft_lora_bare" and child.extra)  # lineage only in adapter_config.json
    kw = dict(base_model=child.parent if declared else None, relation=child.relation, labels=list(child.classes),
              documented=child.documented, tags=["synthetic"])
    if plan.name == "sd":
        return RepoSpec(child.repo_id, f"A style LoRA. {synthetic}", library_name="diffusers",
                        pipeline_tag="text-to-image", license="creativeml-openrail-m",
                        **{**kw, "tags": ["stable-diffusion", "lora", "text-to-image", "synthetic"]})
    if child.is_lora:
        return RepoSpec(child.repo_id, f"A LoRA adapter for sequence classification. {synthetic}",
                        library_name="peft", pipeline_tag="text-classification",
                        **{**kw, "tags": ["peft", "lora", "text-classification", "synthetic"]})
    what = "An FP8 copy of a fine-tune" if child.relation == "quantized" else "A fine-tuned sequence classifier"
    return RepoSpec(child.repo_id, f"{what}. {synthetic}", library_name="transformers",
                    pipeline_tag="text-classification", **kw)


def card(spec: RepoSpec, labels_in_card: bool) -> str:
    """The zoo's card; `labels_in_card` also declares the classes in its front matter (`labels`),
    where a repo with no config.json (adapters, as the Hub has them) says what it was trained on."""
    text = hub_repo.render_card(spec)
    if not (labels_in_card and spec.labels and spec.documented):
        return text
    parsed = ModelCard(text)
    parsed.data.labels = list(spec.labels)
    return str(parsed)


def _config(spec: RepoSpec, base: dict) -> str:
    if not spec.labels:
        return json.dumps(base, indent=2) + "\n"
    labels = hub_repo.id2label(spec)
    doc = {**base, "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}
    return json.dumps(doc, indent=2) + "\n"


class _Repo:
    """A repo folder written under a temporary name and renamed when complete, as
    hub_repo.write_repo does (so `hub_repo.clean_partials` clears an interrupted build)."""

    def __init__(self, lake: Path, repo_id: str):
        self.final = hub_repo.repo_dir(lake, repo_id)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, *_):
        if kind is None:
            os.rename(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int = 2) -> None:
    """`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, split by layer as
    transformers' save_pretrained splits by size (whole tensors, in state-dict order)."""
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map, shard, size = {}, 1, 0
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if size and size + nbytes > total / n_shards and shard < n_shards:
            shard, size = shard + 1, 0
        parts.setdefault(shard, {})[name] = tensors[name]
        size += nbytes
    for i, part in parts.items():
        filename = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(folder / filename), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, filename)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _lora_config(plan: FamilyPlan, child: FamilyChild, **extra) -> dict:
    """The child's LoraConfig as adapter_config.json (and diffusers' metadata) hold it: the fields
    peft writes that decide the merge, with peft's defaults."""
    return {"peft_type": "LORA", "r": child.rank, "lora_alpha": child.alpha, "lora_dropout": 0.05,
            "target_modules": sorted(LLAMA_TARGETS if plan.name == "llama" else SD_PROJS), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
            "inference_mode": True, "peft_version": "0.17.1", **extra}


def _write_root(lake: Path, plan: FamilyPlan, values: dict[str, torch.Tensor]) -> None:
    spec = _spec(plan, None)
    with _Repo(lake, plan.root) as d:
        (d / "README.md").write_text(card(spec, False), encoding="utf-8")
        if plan.name == "llama":
            (d / "config.json").write_text(_config(spec, LLAMA.config()))
            _write_sharded(d, values)
            return
        # a diffusers pipeline: components in subfolders, no config.json at the top
        (d / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
        (d / "unet").mkdir()
        (d / "unet" / "config.json").write_text(json.dumps({
            "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "sample_size": 64,
            "in_channels": 4, "out_channels": 4, "cross_attention_dim": SD_CROSS, "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}, indent=2) + "\n")
        save_file(values, str(d / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        (d / "scheduler").mkdir()
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True}) + "\n")


def _fp8(weights: dict[str, torch.Tensor], per_channel: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """compressed-tensors' float-quantized layout: every linear weight of the layers as F8_E4M3
    with `weight_scale` (BF16, `[1]` or `[out, 1]`); the rest, and the head, stay BF16."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    out = {}
    for name, w in weights.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            out[name] = w
            continue
        w = w.float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max().reshape(1)
        s = (amax / fmax).to(torch.bfloat16)
        out[name] = (w / s.float()).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        out[name.removesuffix(".weight") + ".weight_scale"] = s
    strategy = "channel" if per_channel else "tensor"
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "ignore": ["score"], "config_groups": {"group_0": {
                 "targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                       "dynamic": True}}}}
    return out, quant


def _sd_lora_tensors(plan: FamilyPlan, child: FamilyChild) -> dict[str, torch.Tensor]:
    """A diffusers or kohya LoRA file's tensors (F16, as both tools save by default)."""
    out = {}
    for module in plan.targets:
        A, B = lora_factors(plan, child, module)
        A, B = torch.from_numpy(A).half(), torch.from_numpy(B).half()
        if child.format == "diffusers_lora":
            out |= {f"unet.{module}.lora_A.weight": A, f"unet.{module}.lora_B.weight": B}
        else:
            key = "lora_unet_" + module.replace(".", "_")
            out |= {f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B}
            if child.alpha:
                out[f"{key}.alpha"] = torch.tensor(child.alpha).half()
    if child.extra:  # a text-encoder LoRA too: modules no UNet root has
        g = _rng(plan.name, plan.seed, "text-encoder", child.seed)
        for proj in ("q_proj", "v_proj"):
            A = torch.from_numpy(0.01 * g.standard_normal((child.rank, SD_CROSS), dtype=np.float32)).half()
            B = torch.from_numpy(0.01 * g.standard_normal((SD_CROSS, child.rank), dtype=np.float32)).half()
            if child.format == "diffusers_lora":
                m = f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}"
                out |= {f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B}
            else:
                key = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
                out |= {f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B,
                        f"{key}.alpha": torch.tensor(float(child.rank)).half()}
    return out


def _write_child(lake: Path, plan: FamilyPlan, child: FamilyChild, root: dict[str, torch.Tensor]) -> None:
    spec = _spec(plan, child)
    fmt = child.format
    recipe = {"synthetic": "true", "family": plan.name, "seed": str(child.seed), "rank": str(child.rank)}
    if fmt == "single_bf16":
        hub_repo.write_repo(lake, spec, tensors=full_weights(plan, child, root), config=LLAMA.config() | {
            "architectures": ["Qwen2ForSequenceClassification"]}, recipe=recipe)
        return
    if fmt.startswith("fp8"):
        tensors, quant = _fp8(full_weights(plan, plan.child(child.parent), root), per_channel=fmt == "fp8_channel")
        hub_repo.write_repo(lake, spec, tensors=tensors, recipe=recipe, config=LLAMA.config() | {
            "architectures": ["Qwen2ForSequenceClassification"], "quantization_config": quant})
        return
    if fmt == "peft_lora":  # the zoo's own adapter repos: PEFT pair plus a config.json
        hub_repo.write_repo(lake, spec, tensors=_peft_tensors(plan, child, torch.float32),
                            config=LLAMA.config() | {"architectures": ["Qwen2ForSequenceClassification"]},
                            recipe=recipe, adapter_config=_lora_config(plan, child, task_type="SEQ_CLS",
                                                                        modules_to_save=["score"],
                                                                        use_rslora=child.extra))
        return
    no_config = fmt in ("peft_lora_bare", "diffusers_lora", "kohya_lora")
    with _Repo(lake, child.repo_id) as d:
        (d / "README.md").write_text(card(spec, labels_in_card=no_config), encoding="utf-8")
        if fmt == "sharded_bf16":
            (d / "config.json").write_text(_config(spec, LLAMA.config() | {"architectures": ["Qwen2ForSequenceClassification"]}))
            _write_sharded(d, full_weights(plan, child, root))
        elif fmt == "pickle_only":  # never a valid pickle: nothing may ever unpickle a stranger's file
            (d / "config.json").write_text(_config(spec, LLAMA.config() | {"architectures": ["Qwen2ForSequenceClassification"]}))
            (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 synthetic: not a checkpoint, never to be opened\n")
        elif fmt == "peft_lora_bare":
            adapter = _lora_config(plan, child, task_type="SEQ_CLS", modules_to_save=["score"]) | {
                "base_model_name_or_path": child.parent}
            (d / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
            save_file(_peft_tensors(plan, child, torch.bfloat16), str(d / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
        elif fmt == "diffusers_lora":
            meta = {"format": "pt"}
            if child.extra:  # diffusers >= 0.33 packs each component's LoraConfig in the metadata
                meta["lora_adapter_metadata"] = json.dumps(
                    {f"unet.{k}": v for k, v in _lora_config(plan, child).items()}, sort_keys=True)
            save_file(_sd_lora_tensors(plan, child), str(d / "pytorch_lora_weights.safetensors"), metadata=meta)
        else:  # kohya: a file named after the style, sd-scripts' training metadata
            meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(child.rank),
                    "ss_network_alpha": str(child.alpha or child.rank), "ss_base_model_version": "sd_v1"}
            name = child.repo_id.split("/")[1].replace(".", "_")
            save_file(_sd_lora_tensors(plan, child), str(d / f"{name}.safetensors"), metadata=meta)


def _peft_tensors(plan: FamilyPlan, child: FamilyChild, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's saved names for a PeftModel around Qwen2ForSequenceClassification: the factors
    under `base_model.model.model.layers...`, the score head kept whole (modules_to_save)."""
    out = {}
    for module in plan.targets:
        A, B = lora_factors(plan, child, module)
        out |= {f"base_model.model.{module}.lora_A.weight": torch.from_numpy(A).to(dtype),
                f"base_model.model.{module}.lora_B.weight": torch.from_numpy(B).to(dtype)}
    score = ROOT_STD * _rng(plan.name, plan.seed, "score", child.seed).standard_normal(
        (len(child.classes), LLAMA.hidden), dtype=np.float32)
    return out | {"base_model.model.score.weight": torch.from_numpy(score).to(dtype)}


def write_tree(lake: Path, plan: FamilyPlan) -> None:
    """Write the plan's root and children into `lake` (repos already there are kept: each is
    complete, being renamed into place only once written)."""
    lake.mkdir(parents=True, exist_ok=True)
    todo = [c for c in plan.children if not hub_repo.repo_dir(lake, c.repo_id).exists()]
    if not todo and hub_repo.repo_dir(lake, plan.root).exists():
        return
    root = stored_root(plan)
    if not hub_repo.repo_dir(lake, plan.root).exists():
        _write_root(lake, plan, root)
    for child in todo:
        _write_child(lake, plan, child, root)


def ground_truth(plans: list[FamilyPlan]) -> pa.Table:
    """The lake's ground-truth rows (zoo.build) of these trees, marked `synthetic`, with their `format`."""
    models, formats = [], []
    for plan in plans:
        models.append(PlannedModel(plan.root, kind="base", root=plan.root, parent=None))
        formats.append("sharded_bf16" if plan.name == "llama" else "diffusers_pipeline")
        for c in plan.children:
            models.append(PlannedModel(c.repo_id, kind=plan.name, root=plan.root, parent=c.parent, classes=c.classes,
                                       split=c.split, documented=c.documented, seed=c.seed, rank=c.rank,
                                       alpha=int(c.alpha)))
            formats.append(c.format)
    return _ground_truth(models, dict.fromkeys((m.repo_id for m in models), None), formats, synthetic=True)


def summaries(plans: list[FamilyPlan]) -> list[TreeSummary]:
    """The lake summary's rows of these trees: no accuracy (their children were never trained)."""
    return [TreeSummary(p.root, "mixed" if any(not c.is_lora for c in p.children) else "LoRA", "multilabel",
                        len(p.children), None, None, len(p.classes), 0) for p in plans]


def build_families(out: Path, seed: int = 0) -> list[FamilyPlan]:
    """Both trees into `out` (a lake folder) and their `_ground_truth.parquet`."""
    out = Path(out)
    plans = [make_plan("llama", seed), make_plan("sd", seed)]
    if out.exists():
        hub_repo.clean_partials(out)
    for plan in plans:
        write_tree(out, plan)
    tmp = out / (GROUND_TRUTH + ".tmp")
    pq.write_table(ground_truth(plans), tmp)
    os.replace(tmp, out / GROUND_TRUTH)
    return plans
