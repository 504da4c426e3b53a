"""What a child trainer hands to the lake writer. The contract between zoo/image*, zoo/text*
and zoo/build.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probex_core.errors import ProbexError


class ZooError(ProbexError):
    """The lake cannot be built as asked; the message says what to do."""


class ZooDataError(ZooError):
    """A data file or package the lake builder needs is missing; the message says how to install it."""


@dataclass
class TrainedChild:
    # Tensors written as-is: model.safetensors for full fine-tunes (the whole state dict, keys as
    # the base model names them), adapter_model.safetensors for LoRA (PEFT's saved key names).
    tensors: dict[str, torch.Tensor]
    # config.json content; id2label is filled from `labels` by the writer (or LABEL_i when the
    # model is written undocumented).
    config: dict
    # Class names in head order (index i = output i). For one-vs-rest detectors: ["other", cls].
    labels: list[str]
    accuracy: float  # held-out task accuracy of this child on its own task
    recipe: dict[str, str] = field(default_factory=dict)  # -> safetensors metadata
    adapter_config: dict | None = None  # PEFT adapter_config.json for LoRA children
