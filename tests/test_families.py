"""Trees at real Hub layouts (issue 17, item 9; zoo/families.py), crawled, extracted, trained and
embedded end to end: the values the pipeline reads are the generator's own."""

from __future__ import annotations

import builtins
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.safetensors_reader import LocalFile, read_header
from zoo.families import (LLAMA, LLAMA_ROOT, SD_BLOCK, SD_CROSS, SD_MID, SD_ROOT, change, lora_scale, make_plan,
                          root_tensor, sd_tensors, write_tree)

LLAMA_LAYER = "model.layers.1.self_attn.q_proj.weight"
SD_LAYER = f"{SD_BLOCK}.attn2.to_k.weight"
PICKLE_REASON = "only pytorch_model.bin (pickle): no safetensors to read, never opened"


def header(path: Path):
    with LocalFile(path) as src:
        return read_header(src)


# -- the layouts, without the pipeline (fast) ----------------------------------------------------


def test_plans_are_deterministic_and_shapes_are_qwen25_05b():
    assert make_plan("llama", 0) == make_plan("llama", 0) and make_plan("sd", 1) != make_plan("sd", 0)
    shapes = LLAMA.tensors()
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (896, 896)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == shapes["model.layers.1.self_attn.v_proj.weight"] == (128, 896)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (896, 4864)
    assert shapes["model.layers.0.post_attention_layernorm.weight"] == (896,) and "lm_head.weight" not in shapes
    plan = make_plan("llama")
    formats = {c.format for c in plan.children}
    assert formats == {"sharded_bf16", "single_bf16", "fp8_tensor", "fp8_channel", "peft_lora", "peft_lora_bare",
                       "pickle_only"}
    for c in plan.children:
        if c.relation == "quantized":  # a copy of a full fine-tune: its classes and its change
            parent = plan.child(c.parent)
            assert parent.format.endswith("bf16") and parent.classes == c.classes
            np.testing.assert_array_equal(change(plan, c.repo_id, plan.targets[0]),
                                          change(plan, parent.repo_id, plan.targets[0]))


def test_a_deep_llamas_candidates_are_its_last_layers():
    """Layers are kept in depth order: by text, Qwen2.5-0.5B's 24 layers would offer layers 6-9
    (`model.layers.9` sorts after `model.layers.23`), its shallowest but six."""
    from storage.extract import candidate_layers

    shapes = replace(LLAMA, layers=24).tensors()
    changed = {n for n in shapes if n.endswith(("q_proj.weight", "v_proj.weight"))}
    got = candidate_layers([{n: s for n, s in shapes.items() if len(s) == 2}], changed)
    assert sorted({int(n.split(".")[2]) for n in got}) == [20, 21, 22, 23]


def test_the_sd_tree_is_written_as_diffusers_and_kohya_write_it(tmp_path):
    plan = make_plan("sd")
    write_tree(tmp_path, plan)
    root = tmp_path / SD_ROOT
    assert json.loads((root / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert json.loads((root / "unet" / "config.json").read_text())["cross_attention_dim"] == SD_CROSS
    assert not (root / "config.json").exists()
    got = {n: i.shape for n, i in header(root / "unet" / "diffusion_pytorch_model.safetensors").tensors.items()}
    assert got == sd_tensors()
    assert got[SD_LAYER] == (320, 768) and got[f"{SD_BLOCK}.attn1.to_q.weight"] == (320, 320)
    assert got[f"{SD_MID}.attn2.to_v.weight"] == (1280, 768)
    for c in plan.children:
        folder = tmp_path / c.repo_id
        files = sorted(p.name for p in folder.iterdir())
        assert "config.json" not in files and "adapter_config.json" not in files  # as the Hub has them
        card = (folder / "README.md").read_text()
        assert f"base_model: {SD_ROOT}" in card and "base_model_relation: adapter" in card
        assert ("labels:" in card) == c.documented and all(cls not in card for cls in c.classes) != c.documented
        if c.format == "diffusers_lora":
            h = header(folder / "pytorch_lora_weights.safetensors")
            assert h.tensors[f"unet.{SD_LAYER.removesuffix('.weight')}.lora_A.weight"].shape == (c.rank, SD_CROSS)
            assert ("lora_adapter_metadata" in h.metadata) == c.extra
        else:
            (name,) = [f for f in files if f.endswith(".safetensors")]
            key = "lora_unet_" + SD_LAYER.removesuffix(".weight").replace(".", "_")
            h = header(folder / name)
            assert h.tensors[f"{key}.lora_down.weight"].shape == (c.rank, SD_CROSS)
            assert h.tensors[f"{key}.lora_up.weight"].shape == (320, c.rank) and h.tensors[f"{key}.lora_up.weight"].dtype == "F16"
            assert (f"{key}.alpha" in h.tensors) == bool(c.alpha)
    assert not list(tmp_path.glob("*/.*.partial-*"))


def test_the_sd_tree_of_diffusers_and_kohya_loras_is_not_mixed(tmp_path):
    """kohya's one `<style>.safetensors` is an adapter by its header (the crawl reads it): the SD
    tree is LoRAs only, so its candidate layers are planned from LoRAs and its root is not read."""
    from probex_core.settings import Settings, apply_runtime_env
    from storage.records import is_adapter
    from tasks.extract import needs_root, tree_members
    from tasks.pipeline import catalog_for, crawl_step, plan_extraction

    plan = make_plan("sd")
    s = Settings.load(tmp_path / "home")
    apply_runtime_env(s)
    write_tree(s.lake, plan)
    crawl_step(s, str(s.lake))
    catalog = catalog_for(s)
    models = {r["repo_id"]: r for r in catalog.read("models").to_pylist()}
    kohya = [c.repo_id for c in plan.children if c.format == "kohya_lora"]
    assert kohya and all(models[m]["weights_kind"] == "lora" and is_adapter(models[m]) for m in kohya)
    assert all(models[m]["adapter_modules"] for m in kohya)
    assert all(is_adapter(models[c.repo_id]) for c in plan.children)
    assert models[SD_ROOT]["weights_kind"] == "full" and not is_adapter(models[SD_ROOT])
    assert not needs_root(tree_members(list(models.values()), SD_ROOT))
    tree = catalog.tree(SD_ROOT)
    assert (tree["n_adapter"], tree["n_finetune"]) == (len(plan.children), 0)
    jobs, planned = plan_extraction(s, [SD_ROOT], [SD_LAYER])
    assert planned == {SD_ROOT: [SD_LAYER]}
    assert sorted(j.opener.repo_id for j in jobs) == sorted(c.repo_id for c in plan.children)  # no root job
    jobs, planned = plan_extraction(s, [SD_ROOT], mode="candidates")  # planned from LoRA headers
    assert SD_LAYER in planned[SD_ROOT] and SD_ROOT not in {j.opener.repo_id for j in jobs}


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def families_home(tmp_path_factory):
    """Both trees in a fresh lake: crawl -> extract one layer per tree, named by the root's tensor
    -> train -> embed. Every open() of this process is watched for the pickle (the workers get
    only the jobs, which the test checks)."""
    from probex_core.settings import Settings, apply_runtime_env
    from tasks.extract import run_extraction
    from tasks.pipeline import catalog_for, crawl_step, embed_step, plan_extraction, record_quarantine
    from tasks.train import default_train_config, train_tree
    from zoo.families import build_families

    t0 = time.perf_counter()
    home = tmp_path_factory.mktemp("families")
    plans = {p.name: p for p in build_families(home / "lake", seed=0)}
    s = Settings.load(home)
    apply_runtime_env(s)
    opened: list[str] = []
    real_open = builtins.open

    def watch(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else "")
        return real_open(file, *args, **kwargs)

    seconds = {"build": time.perf_counter() - t0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", watch)
        t0 = time.perf_counter()
        steps = {"crawl": crawl_step(s, str(s.lake)), "seconds": seconds}
        seconds["crawl"] = time.perf_counter() - t0
        # one layer per tree, as `probex extract --tree T --layers NAME` plans it; both trees' jobs
        # run on one cluster (a LocalCluster per tree would double its start-up)
        jobs, plans_done = [], {}
        for tree, layer in ((LLAMA_ROOT, LLAMA_LAYER), (SD_ROOT, SD_LAYER)):
            tree_jobs, planned = plan_extraction(s, [tree], [layer])
            jobs += tree_jobs
            plans_done |= planned
        t0 = time.perf_counter()
        summary = run_extraction(jobs, n_workers=1)
        record_quarantine(catalog_for(s), summary.results)
        seconds["extract"] = time.perf_counter() - t0
        steps |= {"jobs": jobs, "planned": plans_done, "extract": summary}
        # train_step's own call per tree, with fewer epochs: this test is about formats and plumbing,
        # and a dense 896 x 896 layer at the default 500 epochs trains for ~100 s on 2 busy cores
        steps["train"] = {}
        for tree, lora in ((LLAMA_ROOT, False), (SD_ROOT, True)):  # the Llama tree is mixed: dense rows
            t0 = time.perf_counter()
            tcfg = replace(default_train_config(lora, "cpu"), max_epochs=30, patience=10, time_limit_s=20.0)
            steps["train"][tree] = train_tree(catalog_for(s), s.shards, str(s.experts), tree, tcfg=tcfg).to_dict()
            seconds[f"train {tree}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps["embed"] = embed_step(s)
        seconds["embed"] = time.perf_counter() - t0
    steps["opened"] = opened
    return s, plans, steps


def _models(s) -> dict[str, dict]:
    from tasks.pipeline import catalog_for

    return {r["repo_id"]: r for r in catalog_for(s).read("models").to_pylist()}


def _rows(s, tree: str, layer: str) -> dict:
    from storage.shards import read_layer

    return {r.repo_id: r for r in read_layer(s.shards, tree, layer)}


@pytest.mark.slow
def test_every_repo_is_catalogued_with_lineage_and_the_pickle_is_never_opened(families_home):
    s, plans, steps = families_home
    models = _models(s)
    gt = {r["repo_id"]: r for r in pq.read_table(s.lake / "_ground_truth.parquet").to_pylist()}
    assert set(models) == set(gt) and all(r["synthetic"] for r in gt.values())
    for repo_id, truth in gt.items():
        row = models[repo_id]
        assert row["tree_id"] == truth["root"], repo_id
        if truth["parent"] is not None:
            assert row["parents"] == [truth["parent"]], repo_id
        assert row["status"] == ("no_safetensors" if truth["format"] == "pickle_only" else "ok"), (repo_id, row["reason"])
        if truth["documented"]:
            assert set(row["labels"] or ()) >= set(truth["classes"]), (repo_id, truth["format"], row["labels"])
    bare = [c for c in plans["llama"].children if c.format == "peft_lora_bare" and c.extra]
    assert bare and all(models[c.repo_id]["lineage_source"] == "adapter_config" for c in bare)
    (pickle,) = [c.repo_id for c in plans["llama"].children if c.format == "pickle_only"]
    assert models[pickle]["reason"] == PICKLE_REASON
    assert pickle not in {j.opener.repo_id for j in steps["jobs"]}
    # the Llama tree mixes full fine-tunes and adapters (its root is read); the SD tree does not
    jobs = {j.opener.repo_id for j in steps["jobs"]}
    assert LLAMA_ROOT in jobs and SD_ROOT not in jobs
    kohya = [c.repo_id for c in plans["sd"].children if c.format == "kohya_lora"]
    assert kohya and all(models[m]["weights_kind"] == "lora" and models[m]["relation"] == "adapter" for m in kohya)
    assert not [p for p in steps["opened"] if "pytorch_model.bin" in p]
    assert steps["extract"].quarantined == [] and all(r.status == "ok" for r in steps["extract"].results)


@pytest.mark.slow
def test_the_llama_layer_is_read_from_every_format_as_the_generator_wrote_it(families_home):
    s, plans, steps = families_home
    plan = plans["llama"]
    module = LLAMA_LAYER.removesuffix(".weight")
    rows = _rows(s, LLAMA_ROOT, LLAMA_LAYER)
    readable = [c for c in plan.children if c.format != "pickle_only"]
    assert set(rows) == {c.repo_id for c in readable} | {LLAMA_ROOT}  # a mixed tree: its root too
    root = root_tensor(plan, LLAMA_LAYER)
    bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(rows[LLAMA_ROOT].X, bf16(root))
    for c in readable:
        row, want = rows[c.repo_id], change(plan, c.repo_id, module)
        if c.format.endswith("bf16"):
            assert (row.kind, row.dtype, row.read_from) == ("dense", "BF16", [LLAMA_LAYER])
            np.testing.assert_array_equal(row.X, bf16(root + want))  # BF16 decoded exactly
        elif c.format.startswith("fp8"):
            assert (row.kind, row.dtype) == ("dequantized", "F8_E4M3")
            assert row.read_from == [LLAMA_LAYER, f"{module}.weight_scale"]
            w = bf16(root + want)
            # E4M3 keeps 3 mantissa bits: each value within 2^-4 of itself, plus the scale's
            # subnormal step near zero (per tensor: one scale; per channel: one a row)
            step = (np.abs(w).max(1, keepdims=True) if c.format == "fp8_channel" else np.abs(w).max()) / 448 * 2**-9
            assert np.all(np.abs(row.X - w) <= 2**-4 * np.abs(w) + step)
            assert np.linalg.norm(row.X - w) < 0.03 * np.linalg.norm(w)
        else:
            assert row.kind == "lora" and row.X is None  # factors kept, not multiplied
            assert (row.A.shape, row.B.shape, row.rank) == ((c.rank, 896), (896, c.rank), c.rank)
            assert row.read_from == [f"base_model.model.{module}.lora_{p}.weight" for p in "AB"]
            assert row.scale == pytest.approx(lora_scale(c), rel=1e-12)
            tol = 1e-5 if c.format == "peft_lora" else 1e-2  # F32 and BF16 factors
            assert np.linalg.norm(row.scale * row.B @ row.A - want) < tol * np.linalg.norm(want)


@pytest.mark.slow
def test_the_sd_layer_is_read_from_diffusers_and_kohya_loras(families_home):
    s, plans, _ = families_home
    plan = plans["sd"]
    module = SD_LAYER.removesuffix(".weight")
    rows = _rows(s, SD_ROOT, SD_LAYER)
    assert set(rows) == {c.repo_id for c in plan.children}  # LoRAs only: the root's layer is never read
    key = "lora_unet_" + module.replace(".", "_")
    for c in plan.children:
        row = rows[c.repo_id]
        assert row.kind == "lora" and row.X is None and (row.A.shape, row.B.shape) == ((c.rank, SD_CROSS), (320, c.rank))
        assert row.scale == pytest.approx(lora_scale(c), rel=1e-12)
        if c.format == "kohya_lora":
            names = [f"{key}.lora_down.weight", f"{key}.lora_up.weight"] + ([f"{key}.alpha"] if c.alpha else [])
        else:
            names = [f"unet.{module}.lora_{p}.weight" for p in "AB"]
        assert row.read_from == names
        want = change(plan, c.repo_id, module)
        assert np.linalg.norm(row.scale * row.B @ row.A - want) < 5e-3 * np.linalg.norm(want)  # F16 factors


@pytest.mark.slow
def test_each_tree_trains_an_expert_and_its_models_get_embeddings(families_home):
    from storage.experts import load_current
    from tasks.pipeline import catalog_for
    from tasks.train import tree_root

    s, plans, steps = families_home
    catalog = catalog_for(s)
    embedded = {}
    for r in catalog.read("embeddings").to_pylist():
        embedded.setdefault(r["tree_id"], {})[r["repo_id"]] = r
    for name, tree, layer in (("llama", LLAMA_ROOT, LLAMA_LAYER), ("sd", SD_ROOT, SD_LAYER)):
        report = steps["train"][tree]
        assert report["skipped"] is None and report["version"] and report["promoted"], report
        assert report["layer"] == layer and report["task"] == "multilabel"
        expert = load_current(s.experts, tree)
        assert expert.version == report["version"] == catalog.tree(tree)["expert_version"]
        readable = {c.repo_id for c in plans[name].children if c.format != "pickle_only"}
        assert set(embedded[tree]) == readable
        assert {r["expert_version"] for r in embedded[tree].values()} == {expert.version}
    # full fine-tunes, FP8 copies and adapters in one tree: read as changes from the root
    print("seconds:", {k: round(v, 1) for k, v in steps["seconds"].items()})  # shown with -rP
    llama = load_current(s.experts, LLAMA_ROOT)
    assert steps["train"][LLAMA_ROOT]["representation"] == "delta" == llama.config["representation"]
    assert llama.config["info"]["root"] == tree_root(catalog, LLAMA_ROOT)
