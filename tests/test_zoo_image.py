"""The image half of the zoo: Fashion-MNIST reading and one EfficientNet-Lite0 child."""

from __future__ import annotations

import pytest
import torch

from zoo import fashion_mnist
from zoo.fashion_mnist import CLASSES, ZooDataError, ZooError


def test_fashion_mnist_reads_idx():
    train, test = fashion_mnist.load_split("train"), fashion_mnist.load_split("t10k")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype.name == "uint8"
    assert sorted(set(train.labels.tolist())) == list(range(len(CLASSES)))


def test_missing_fashion_mnist_names_the_fix(tmp_path):
    with pytest.raises(ZooDataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_split("train", tmp_path)
    assert issubclass(ZooDataError, ZooError)


def test_image_child_learns_and_is_deterministic():
    from zoo.image_children import FIRST_TRAINED, load_image_base, train_image_child

    base = load_image_base()
    kw = dict(seed=3, lr=2e-3, epochs=3)
    a = train_image_child(base, [0, 1, 5, 7, 8], **kw)
    b = train_image_child(base, [0, 1, 5, 7, 8], **kw)
    assert sorted(a.labels) == sorted(CLASSES[i] for i in (0, 1, 5, 7, 8))
    assert a.accuracy > 0.5  # chance is 0.2
    assert a.labels == b.labels and a.accuracy == b.accuracy
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # the whole state dict, base key names; the layers below the trained blocks are the base's
    assert set(a.tensors) == set(base.state) and a.tensors["_fc.weight"].shape == (5, 1280)
    assert torch.equal(a.tensors["_blocks.3._project_conv.weight"], base.state["_blocks.3._project_conv.weight"])
    probed = f"_blocks.{FIRST_TRAINED + 1}._project_conv.weight"
    assert not torch.equal(a.tensors[probed], base.state[probed])
    assert a.config["num_classes"] == 5 and a.config["architectures"] == ["EfficientNet"]
    assert not any(name in value for value in a.recipe.values() for name in CLASSES)

    # a chain: a child continued from another child starts from its trunk, not the base's
    c = train_image_child(base, [2, 3, 4, 6, 9], seed=4, lr=1e-3, epochs=1, init_state=a.tensors)
    d = train_image_child(base, [2, 3, 4, 6, 9], seed=4, lr=1e-3, epochs=1)
    assert not torch.equal(c.tensors[probed], d.tensors[probed])
