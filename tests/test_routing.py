import math

import numpy as np

from probex_core.routing import Fingerprint, TreeSignature, fingerprint_names, route


def _tree(tree_id, rng, shapes):
    return TreeSignature(tree_id, root_tensors={n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})


def test_finetune_goes_to_its_root_and_random_init_stays_unassigned():
    rng = np.random.default_rng(0)
    a = _tree("org/a", rng, {"w1": (8, 8), "w2": (4, 8)})
    b = _tree("org/b", rng, {"w1": (8, 8), "w2": (4, 8)})
    child = {n: w + 0.02 * rng.standard_normal(w.shape).astype(np.float32) for n, w in a.root_tensors.items()}
    d = route(Fingerprint("x/child", tensors=child), [a, b])
    assert d.tree_id == "org/a"
    assert d.distances["org/a"] < 0.1 < d.distances["org/b"]

    stranger = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in a.root_tensors.items()}
    d = route(Fingerprint("x/stranger", tensors=stranger), [a, b])
    assert d.tree_id is None and "away" in d.reason
    assert all(v > 1.0 for v in d.distances.values())


def test_other_architecture_is_infinitely_far():
    rng = np.random.default_rng(1)
    a = _tree("org/a", rng, {"w1": (8, 8)})
    d = route(Fingerprint("x/y", tensors={"w1": np.zeros((3, 3), np.float32)}), [a])
    assert d.tree_id is None and math.isinf(d.distances["org/a"])


def test_ambiguous_between_two_close_roots_is_not_forced():
    rng = np.random.default_rng(2)
    a = _tree("org/a", rng, {"w1": (16, 16)})
    b = TreeSignature("org/b", root_tensors={"w1": a.root_tensors["w1"] * 1.01})
    d = route(Fingerprint("x/y", tensors={"w1": a.root_tensors["w1"] * 1.005}), [a, b])
    assert d.tree_id is None and d.reason.startswith("ambiguous")


def test_adapter_routed_by_modules_and_shapes():
    l6 = TreeSignature("st/L6", adapter_modules={("encoder.layer.4.attention.self.query", 384, 384),
                                                 ("encoder.layer.5.attention.self.value", 384, 384)})
    l3 = TreeSignature("st/L3", adapter_modules={("encoder.layer.1.attention.self.query", 384, 384),
                                                 ("encoder.layer.2.attention.self.value", 384, 384)})
    fp = Fingerprint("x/lora", adapter_modules={("encoder.layer.5.attention.self.value", 384, 384)})
    assert route(fp, [l6, l3]).tree_id == "st/L6"
    odd = Fingerprint("x/odd", adapter_modules={("encoder.layer.5.attention.self.value", 768, 768)})
    assert route(odd, [l6, l3]).tree_id is None


def test_fingerprint_names_spread_and_skip_vectors():
    shapes = {f"t{i:02d}": (4, 4) for i in range(10)} | {"bias": (4,), "huge": (4096, 4096)}
    names = fingerprint_names(shapes, k=3)
    assert names == ["t00", "t04", "t09"]
    assert "bias" not in names and "huge" not in names


def test_heads_are_never_fingerprints():
    shapes = {"_blocks.0.w": (8, 8), "_conv_head.weight": (16, 8, 1, 1), "_fc.weight": (1000, 16),
              "classifier.weight": (2, 8), "encoder.pooler.dense.weight": (8, 8)}
    names = fingerprint_names(shapes, k=5)
    assert "_fc.weight" not in names and "classifier.weight" not in names
    assert "encoder.pooler.dense.weight" not in names
    assert "_conv_head.weight" in names
