"""Lineage -> trees: chains, merges, cycles, missing parents, undeclared lineage."""

from __future__ import annotations

import pytest

from probex_core.lineage import CYCLE, MERGE, MISSING_PARENT, NO_LINEAGE, Placement, place, trees


def test_chain_places_every_model_under_the_root_with_depth():
    p = place({
        "r/root": ([], None),
        "a/child": (["r/root"], "finetune"),
        "a/grand": (["a/child"], "adapter"),
        "a/quant": (["a/grand"], "quantized"),
    })
    assert {m: (x.tree_id, x.depth) for m, x in p.items()} == {
        "r/root": ("r/root", 0), "a/child": ("r/root", 1), "a/grand": ("r/root", 2), "a/quant": ("r/root", 3)
    }
    assert p["a/grand"] == Placement("a/grand", "r/root", "a/child", ("a/child",), "adapter", 2, frozenset())
    assert p["r/root"].is_root and p["r/root"].flags == {NO_LINEAGE} and p["r/root"].parent is None
    assert p["a/quant"].relation == "quantized"


def test_very_deep_chain_needs_no_recursion():
    n = 20_000  # far past the interpreter recursion limit
    models = {"m/0": ([], None), **{f"m/{i}": ([f"m/{i - 1}"], "finetune") for i in range(1, n)}}
    p = place(models)
    assert p[f"m/{n - 1}"].tree_id == "m/0" and p[f"m/{n - 1}"].depth == n - 1


def test_merge_records_all_parents_and_places_by_the_first():
    p = place({
        "r/a": ([], None), "r/b": ([], None),
        "x/merged": (["r/a", "r/b"], "merge"),
    })
    m = p["x/merged"]
    assert (m.tree_id, m.parent, m.parents, m.depth) == ("r/a", "r/a", ("r/a", "r/b"), 1)
    assert MERGE in m.flags
    assert p["r/b"].tree_id == "r/b"  # named as a parent (even second): a root, not unassigned


def test_missing_parent_names_the_tree():
    p = place({
        "a/child": (["gone/root"], "finetune"),
        "a/grand": (["a/child"], "finetune"),
    })
    assert (p["a/child"].tree_id, p["a/child"].depth) == ("gone/root", 1)
    assert MISSING_PARENT in p["a/child"].flags
    assert (p["a/grand"].tree_id, p["a/grand"].depth, p["a/grand"].flags) == ("gone/root", 2, frozenset())


def test_chain_ends_at_first_unknown_parent():
    # a -> b (crawled) -> c (not crawled): c names the tree even if c itself declares more upstream.
    p = place({"x/a": (["x/b"], None), "x/b": (["x/c"], None)})
    assert p["x/a"].tree_id == "x/c" and p["x/b"].tree_id == "x/c"
    assert MISSING_PARENT in p["x/b"].flags and MISSING_PARENT not in p["x/a"].flags


def test_no_lineage_is_unassigned_unless_someone_points_to_it():
    p = place({"lone/model": ([], None), "r/root": ([], None), "a/kid": (["r/root"], None)})
    lone = p["lone/model"]
    assert (lone.tree_id, lone.depth, lone.parent) == (None, None, None)
    assert lone.flags == {NO_LINEAGE}
    assert p["r/root"].tree_id == "r/root"
    assert trees(p) == {"r/root": ["r/root", "a/kid"]}


@pytest.mark.parametrize("order", [1, -1])
def test_cycle_is_cut_at_smallest_id_and_flagged(order):
    items = [
        ("c/b", (["c/c"], None)),
        ("c/c", (["c/a"], None)),
        ("c/a", (["c/b"], None)),
        ("t/tail", (["c/c"], "finetune")),
    ][::order]
    p = place(dict(items))
    assert {m: p[m].tree_id for m in p} == {"c/a": "c/a", "c/b": "c/a", "c/c": "c/a", "t/tail": "c/a"}
    assert (p["c/a"].depth, p["c/c"].depth, p["c/b"].depth, p["t/tail"].depth) == (0, 1, 2, 2)
    assert all(CYCLE in p[m].flags for m in ("c/a", "c/b", "c/c"))
    assert CYCLE not in p["t/tail"].flags
    assert p["c/a"].parent == "c/b"  # the declared link is kept; depth 0 + cycle say it was cut


def test_two_cycle_and_self_reference():
    p = place({"x/a": (["x/b"], None), "x/b": (["x/a"], None), "s/self": (["s/self"], None),
               "s/selfmerge": (["s/selfmerge", "x/b"], None)})
    assert p["x/a"].tree_id == p["x/b"].tree_id == "x/a"
    assert p["s/self"].tree_id is None and p["s/self"].flags == {CYCLE, NO_LINEAGE}
    sm = p["s/selfmerge"]
    assert (sm.tree_id, sm.parent, sm.depth) == ("x/a", "x/b", 2) and CYCLE in sm.flags


def test_placement_does_not_depend_on_input_order():
    models = {"a/r": ([], None), "a/1": (["a/r"], None), "a/2": (["a/1"], None), "b/x": (["b/y"], None),
              "b/y": (["b/x"], None), "m/m": (["a/2", "b/x"], "merge")}
    assert place(models) == place(dict(reversed(list(models.items()))))


def test_fixture_lake_lineage(tmp_path):
    from minilake import build_lake

    from storage.sources import LocalSource

    recs = list(LocalSource(build_lake(tmp_path / "lake")).list_models())
    p = place({r.repo_id: (r.base_model, r.base_model_relation) for r in recs})
    assert {m for m, x in p.items() if x.tree_id == "base/root-model"} == {
        "base/root-model", "org/child-ft", "org/child-lora", "org/grandchild", "org/merge", "org/no-config",
    }
    assert p["org/orphan"].tree_id == "gone/missing-root"
    assert p["org/undeclared"].tree_id is None and p["org/bad-base"].tree_id is None


# --- ids as the Hub compares them, relations as the Hub infers them ---------------------------


def test_ids_compare_case_insensitively_and_keep_the_repos_own_spelling():
    p = place({
        "Base/Root": ([], None),
        "a/kid": (["base/ROOT"], "finetune"),
        "a/grand": (["A/Kid"], None),
        "b/one": (["gone/Up"], None), "b/two": (["GONE/up"], None),  # one unknown parent, two spellings
        "s/self": (["S/Self"], None),  # itself in another case: a cycle of one
    })
    assert (p["a/kid"].tree_id, p["a/kid"].parent, p["a/kid"].parents) == ("Base/Root", "Base/Root", ("Base/Root",))
    assert (p["a/grand"].tree_id, p["a/grand"].parent, p["a/grand"].depth) == ("Base/Root", "a/kid", 2)
    assert p["Base/Root"].is_root and NO_LINEAGE in p["Base/Root"].flags
    assert p["b/one"].tree_id == p["b/two"].tree_id == "GONE/up"  # the smallest spelling, for both
    assert p["s/self"].tree_id is None and p["s/self"].flags == {CYCLE, NO_LINEAGE}
    assert place({"x/kid": (["x/ROOT"], None)}, known_roots={"x/root"})["x/kid"].tree_id == "x/ROOT"
    # a root known from outside, spelled otherwise by the stored rows, is still a root
    q = place({"x/root": ([], None)}, known_roots={"X/Root"})
    assert q["x/root"].is_root


@pytest.mark.parametrize("declared, n, adapter, quantized, want", [
    ("finetune", 1, True, False, ("finetune", False)),  # declared wins, even over the files
    ("quantized", 1, False, False, ("quantized", False)),
    ("merge", 2, False, False, ("merge", False)),
    (None, 1, True, False, ("adapter", True)),
    (None, 2, False, False, ("merge", True)),
    (None, 1, False, True, ("quantized", True)),
    (None, 1, False, False, ("finetune", True)),
    ("lora", 1, True, False, ("adapter", True)),  # not one of the Hub's values: inferred
    (None, 0, True, False, (None, False)),  # a root has no relation
])
def test_relation_is_declared_or_inferred_as_the_hub_does(declared, n, adapter, quantized, want):
    from probex_core.lineage import infer_relation

    assert infer_relation(declared, n, adapter=adapter, quantized=quantized) == want
