"""Build the bundled demo model lake (docs/lake.md): real bases, real fine-tunes, Hub-shaped repos.

    build_lake(Path("lake"), "small", seed=0)

Two stages. `make_plan(size, seed, mess)` decides everything that is chosen at random, with no
training and no disk: every repo id, its tree, classes, split, hyperparameters and which models
carry the "realistic mess". `build_lake` then writes the plan's repos one by one, skipping those
already complete on disk (a repo folder only appears, by rename, once complete), so an interrupted
build resumes where it stopped and the same seed always gives the same lake. `_ground_truth.parquet`
and the finished `_lake.json` are written last.

Three trees:
- image:  efficientnet/efficientnet-lite0, full fine-tunes, each child a random 5 of the 10
          Fashion-MNIST classes (multi-label, as the paper's Model-J splits);
- L3:     sentence-transformers/paraphrase-MiniLM-L3-v2, LoRA, each child a random half of a
          WordNet class pool (multi-label);
- L6:     sentence-transformers/all-MiniLM-L6-v2, LoRA, each child a one-vs-rest detector of one
          WordNet class (single concept); a third of the classes are held out (split `holdout`).
The `hard` size (the benchmark's only) has no image tree and adds a fourth kind of child:
- L3D:    a re-upload of paraphrase-MiniLM-L3-v2 under another name (its own root, as Hub mirrors
          are), LoRA one-vs-rest detectors like L6's on a sample of L6's classes, so a single-concept
          tree whose layers do not read the text encoder's space.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from safetensors.torch import load_file

from probex_core.splits import is_val
from zoo import fashion_mnist, hub_repo, wordnet
from zoo.types import ZooError
from zoo.hub_repo import RepoSpec
from zoo.types import TrainedChild

IMAGE_ROOT = "efficientnet/efficientnet-lite0"
L3_ROOT = "sentence-transformers/paraphrase-MiniLM-L3-v2"
L6_ROOT = "sentence-transformers/all-MiniLM-L6-v2"
# A mirror of the L3 base: same weights, its own repo and tree (the L3 root already hosts the
# multi-label tree, and a tree is named by its root). text_bases loads it by its name part.
L3D_ROOT = "minilm-mirror/paraphrase-MiniLM-L3-v2"
GROUND_TRUTH = "_ground_truth.parquet"
MANIFEST = "_lake.json"
TEST_SHARE = 0.2  # of each tree's in-distribution children: undocumented, split "test"
MAX_ATTEMPTS = 3  # seeds tried before a child that will not learn its task is left out
WORKERS = min(2, os.cpu_count() or 1)  # single-threaded training processes


@dataclass(frozen=True)
class SizeSpec:
    image: int  # image children (chains included)
    l3: int  # L3 multi-label children
    l3_pool: int  # classes in the L3 pool; each child takes half of them
    l6_classes: int  # L6 training classes
    l6_holdout_classes: int
    l6: int  # L6 children over training classes
    l6_holdout: int  # L6 children over held-out classes
    l6_spare: int = 0  # extra L6 children over training classes, from their own random stream
    l3_extra: int = 0  # extra L3 children, from their own random stream (a larger L3 test split)
    # hard only: L3D detectors over a sample of the L6 classes (training from training, held-out
    # from held-out, so each tree keeps the 20% held-out rule)
    l3d_classes: int = 0
    l3d_holdout_classes: int = 0
    l3d: int = 0
    l3d_holdout: int = 0
    # WordNet texts per class: n_train + n_heldout are used, from classes of min_lemmas or more;
    # fewer admit more classes (about 600 disjoint classes have 20 or more, 300 have 40 or more)
    n_train: int = 16
    n_heldout: int = 16
    min_lemmas: int = 40
    # training texts per class of an L3 (multi-label) child, when fewer than n_train: its cost is
    # linear in its classes x texts, and a 50-class child is the hard lake's dearest
    l3_n_train: int | None = None
    # the two trees at real Hub layouts (zoo/families.py): synthetic weights, written in seconds
    families: bool = False

    def __post_init__(self):
        counts = {f.name: getattr(self, f.name) for f in fields(self)}
        if any(n < 0 for n in counts.values() if n is not None):
            raise ZooError(f"a lake size needs non-negative counts, got {counts}")
        if self.l3 + self.l3_extra and self.l3_pool < 4:
            raise ZooError(f"an L3 pool of {self.l3_pool} classes is too small: each child takes half, two at least")
        for tree, n, classes in (("l6", self.l6, self.l6_classes), ("l6 held-out", self.l6_holdout, self.l6_holdout_classes),
                                 ("l3d", self.l3d, self.l3d_classes),
                                 ("l3d held-out", self.l3d_holdout, self.l3d_holdout_classes)):
            if n and not classes:
                raise ZooError(f"{n} {tree} children need at least one {tree} class")
        if self.l3d_classes > self.l6_classes or self.l3d_holdout_classes > self.l6_holdout_classes:
            raise ZooError("L3D classes are drawn from the L6 classes: ask for no more of them than L6 has")
        if self.l3d and self.l3d_classes < 2:
            raise ZooError("an L3D detector needs another training class for its negatives")
        if (self.n_train < 1 or self.n_heldout < 1 or self.min_lemmas < self.n_train + self.n_heldout
                or not 0 < (self.l3_n_train or 1) <= self.n_train):
            raise ZooError(f"each class needs training and held-out texts, and min_lemmas >= n_train + n_heldout "
                           f"(got {self.n_train}, {self.n_heldout}, {self.min_lemmas})")

    @property
    def n_pool(self) -> int:
        """Distinct WordNet classes drawn (L3D reuses L6's)."""
        return self.l3_pool + self.l6_classes + self.l6_holdout_classes


# Sized by measured per-child cost (one thread per worker, two workers; see the benchmark report).
SIZES = {
    # tiny: every tree still trains an expert in tests (three children per L6 training class).
    "tiny": SizeSpec(image=8, l3=8, l3_pool=10, l6_classes=4, l6_holdout_classes=2, l6=12, l6_holdout=2,
                     families=True),
    # small: 60 more L3 children than first planned: with 60 the L3 tree had 8 test models (80
    # entries), too few to tell experts apart (ProbeX 0.938-0.988 over seeds vs Dense 0.950).
    "small": SizeSpec(image=95, l3=60, l3_pool=10, l6_classes=40, l6_holdout_classes=20, l6=120, l6_holdout=30,
                      l3_extra=60, families=True),
    # full: the seed-0 build left out one L6 child that no seed taught its task (1,499 of 1,500);
    # four spares keep the floor of 1,500 fine-tuned models with room for a few such children.
    "full": SizeSpec(image=450, l3=300, l3_pool=20, l6_classes=150, l6_holdout_classes=75, l6=600, l6_holdout=150,
                     l6_spare=4, families=True),
    # hard (issue 20; built by the benchmark only): a 50-of-100 multi-label L3 tree of 600
    # children (the paper's protocol); the SD_1k regime on L6, 500 classes of 4 children each, a
    # fifth held out; L3D detectors on 200 of those classes, a fifth held out. 20 texts a class
    # (12 to train, 8 to test) admit the 600 distinct classes this needs;
    # L3 children train on 6 of the 12: their 50 classes make them the build's dearest children.
    "hard": SizeSpec(image=0, l3=600, l3_pool=100, l6_classes=400, l6_holdout_classes=100, l6=1600,
                     l6_holdout=400, l3d_classes=160, l3d_holdout_classes=40, l3d=640, l3d_holdout=160,
                     n_train=12, n_heldout=8, min_lemmas=20, l3_n_train=6),
}


@dataclass(frozen=True)
class Mess:
    """How much real-world untidiness the lake carries (all off with `mess=False`)."""

    undeclared: float = 0.05  # share of each tree's children whose card omits base_model
    chains: int = 2  # image children fine-tuned from another image child
    corrupt: bool = True  # one truncated, one lying-header and one all-NaN weights file
    outsiders: int = 2  # random-init EfficientNet-Lite0s from outside every tree

    @classmethod
    def none(cls) -> "Mess":
        return cls(undeclared=0.0, chains=0, corrupt=False, outsiders=0)


# Hyperparameters drawn per child, as Model-J varies them, so a probe cannot key on one recipe.
IMAGE_LRS, IMAGE_EPOCHS = (5e-4, 1e-3, 2e-3), (3, 4, 5)
TEXT_LRS, TEXT_EPOCHS, RANKS = (1e-3, 2e-3, 3e-3), (6, 7, 8), (8, 16)

# Repo ids: plausible Hub users and model names that never hint at a model's classes.
ORGS = ["kaito-ml", "deepfield-lab", "jmartin", "acme-research", "vision-team-42", "lin-z",
        "oakridge-ai", "m-ozturk", "nlp-sandbox", "quantlabs", "tinyml-hub", "sofia-r", "brightpath",
        "p-novak", "edge-inference", "datacraft", "hkim", "ml-playground", "northwind-ai", "r-gupta",
        "stellar-nlp", "a-dubois", "bytecraft", "cortex-labs", "y-tanaka"]
STEMS = {IMAGE_ROOT: ["efficientnet-lite0", "effnet-lite0", "lite0"],
         L3_ROOT: ["paraphrase-minilm-l3", "minilm-l3", "minilm"],
         L6_ROOT: ["all-minilm-l6", "minilm-l6", "minilm"],
         L3D_ROOT: ["paraphrase-minilm-l3", "minilm-l3", "minilm"]}
NEUTRAL_STEMS = ["model", "checkpoint", "my-model", "proj", "baseline", "exp"]
WORDS = ["ft", "finetuned", "tuned", "custom", "run", "v2", "nova", "zephyr", "lumen", "quanta",
         "helio", "draft", "final", "best", "tmp"]


@dataclass(frozen=True)
class PlannedModel:
    repo_id: str
    kind: str  # "base" | "image" | "l3" | "l6" | "l3d" | "outsider"
    root: str | None  # tree root repo id; None outside every tree
    parent: str | None  # the model it was fine-tuned from, declared on its card or not
    classes: tuple[str, ...] = ()
    split: str | None = None  # train/val/test/holdout; None for bases and outsiders
    documented: bool = True
    lineage_declared: bool = True
    corruption: str | None = None  # one of hub_repo.CORRUPTIONS
    seed: int = 0
    lr: float = 0.0
    epochs: int = 0
    rank: int = 0  # LoRA only
    alpha: int = 0  # LoRA only


@dataclass
class Plan:
    size: str
    seed: int
    mess: Mess
    models: list[PlannedModel]
    l3_pool: list[str]
    l6_classes: list[str]
    l6_holdout: list[str]
    lora_init_seed: dict[str, int] = field(default_factory=dict)  # per LoRA tree root
    l3d_classes: list[str] = field(default_factory=list)
    l3d_holdout: list[str] = field(default_factory=list)
    families: list = field(default_factory=list)  # zoo.families.FamilyPlan, one per family tree

    @property
    def n_repos(self) -> int:
        """Every repo the lake will hold: the trained trees' and the family trees'."""
        return len(self.models) + sum(1 + len(f.children) for f in self.families)


@dataclass
class TreeSummary:
    root: str
    kind: str  # "full" | "LoRA"
    task: str  # the head kind its children call for (a probex_core.heads name)
    n_models: int  # children (the root not counted)
    mean_accuracy: float | None
    min_accuracy: float | None
    n_classes: int
    n_holdout_classes: int


@dataclass
class LakeSummary:
    out: str
    size: str
    seed: int
    trees: list[TreeSummary]
    n_models: int  # every repo in the lake: bases, children, outsiders
    n_finetuned: int
    seconds: float
    bytes_on_disk: int

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- the plan


def _name_maker(rng: random.Random, taken: set[str] | None = None):
    taken = set() if taken is None else taken

    def make(root: str | None, declared: bool) -> str:
        # undeclared models get neutral names: a name like "minilm-l6-..." would declare lineage
        stems = STEMS[root] if root and declared else NEUTRAL_STEMS
        while True:
            repo_id = f"{rng.choice(ORGS)}/{rng.choice(stems)}-{rng.choice(WORDS)}-{rng.randrange(1, 1000)}"
            if repo_id not in taken:
                taken.add(repo_id)
                return repo_id

    return make


def _spread(classes: list[str], n: int) -> list[str]:
    """n children over classes round-robin: every class gets n // len or one more."""
    return [classes[i % len(classes)] for i in range(n)]


def make_plan(size: str, seed: int = 0, mess: Mess = Mess()) -> Plan:
    """Everything random about a lake, decided up front from (size, seed, mess)."""
    if size not in SIZES:
        raise ZooError(f"unknown lake size {size!r}: choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    rng = random.Random(f"probex-lake/{size}/{seed}")
    new_name = _name_maker(rng)

    pool = [c.name for c in _class_pool(spec, seed)]
    l3_pool = pool[:spec.l3_pool]
    l6_classes = pool[spec.l3_pool:spec.l3_pool + spec.l6_classes]
    l6_holdout = pool[spec.l3_pool + spec.l6_classes:]
    # own stream: sizes without L3D draw nothing here, so their plans are as they were
    l3d_rng = random.Random(f"probex-lake/{size}/{seed}/l3d-classes")
    l3d_classes = l3d_rng.sample(l6_classes, spec.l3d_classes) if spec.l3d_classes else []
    l3d_holdout = l3d_rng.sample(l6_holdout, spec.l3d_holdout_classes) if spec.l3d_holdout_classes else []
    check_tree_classes("L3", l3_pool, [])
    check_tree_classes("L6", l6_classes, l6_holdout)
    check_tree_classes("L3D", l3d_classes, l3d_holdout)

    # (root, kind, classes, holdout?) for every child, tree by tree
    jobs = [(IMAGE_ROOT, "image", tuple(rng.sample(fashion_mnist.CLASSES, 5)), False) for _ in range(spec.image)]
    jobs += [(L3_ROOT, "l3", tuple(rng.sample(l3_pool, len(l3_pool) // 2)), False) for _ in range(spec.l3)]
    jobs += [(L6_ROOT, "l6", (c,), False) for c in _spread(l6_classes, spec.l6)]
    jobs += [(L6_ROOT, "l6", (c,), True) for c in _spread(l6_holdout, spec.l6_holdout)]
    jobs += [(L3D_ROOT, "l3d", (c,), False) for c in _spread(l3d_classes, spec.l3d)]
    jobs += [(L3D_ROOT, "l3d", (c,), True) for c in _spread(l3d_holdout, spec.l3d_holdout)]

    # which children carry the mess, drawn per tree; chains only between declared, intact children
    by_tree: dict[str, list[int]] = {}
    for i, (root, *_rest) in enumerate(jobs):
        by_tree.setdefault(root, []).append(i)
    undeclared: set[int] = set()
    for members in by_tree.values():
        k = min(len(members), math.ceil(mess.undeclared * len(members)))
        undeclared |= set(rng.sample(members, k))
    images = by_tree.get(IMAGE_ROOT, [])
    # a chain: a later image child continues from an earlier, declared, intact one
    chains: dict[int, int] = {}
    clean = [i for i in images if i not in undeclared]
    for _ in range(min(mess.chains, len(clean) // 2)):
        child = rng.choice([i for i in clean[1:] if i not in chains and i not in chains.values()])
        chains[child] = rng.choice([i for i in clean if i < child and i not in chains])
    corrupt: dict[int, str] = {}
    if mess.corrupt:
        spare = [i for i in range(len(jobs)) if i not in chains and i not in chains.values()]
        corrupt = dict(zip(rng.sample(spare, len(hub_repo.CORRUPTIONS)), hub_repo.CORRUPTIONS))

    lora_init_seed = {L3_ROOT: rng.randrange(2**31), L6_ROOT: rng.randrange(2**31)}
    if spec.l3d or spec.l3d_holdout:
        lora_init_seed[L3D_ROOT] = l3d_rng.randrange(2**31)
    # a tree's root is in the lake when the tree has children (hard has no image tree)
    models = [PlannedModel(root, "base", root, None) for root in (IMAGE_ROOT, L3_ROOT, L6_ROOT, L3D_ROOT)
              if root in by_tree]
    ids: list[str] = []
    for i, (root, kind, classes, holdout) in enumerate(jobs):
        declared = i not in undeclared
        ids.append(new_name(root, declared))
        models.append(_planned_child(rng, ids[-1], kind, root, classes, holdout, declared,
                                     parent=ids[chains[i]] if i in chains else root, corruption=corrupt.get(i)))
    for _ in range(mess.outsiders):
        models.append(PlannedModel(new_name(None, False), "outsider", None, None, documented=False,
                                   lineage_declared=False, seed=rng.randrange(2**31)))
    # Spares and extras come from their own streams, so adding them (a resumed build of an older
    # plan) leaves every other model of the plan as it was.
    spare_rng = random.Random(f"probex-lake/{size}/{seed}/spares")
    spare_name = _name_maker(spare_rng, taken={m.repo_id for m in models})
    for c in _spread(spare_rng.sample(l6_classes, len(l6_classes)), spec.l6_spare):
        models.append(_planned_child(spare_rng, spare_name(L6_ROOT, True), "l6", L6_ROOT, (c,), False, True,
                                     parent=L6_ROOT, corruption=None))
    extra_rng = random.Random(f"probex-lake/{size}/{seed}/l3-extra")
    extra_name = _name_maker(extra_rng, taken={m.repo_id for m in models})
    for _ in range(spec.l3_extra):
        classes = tuple(extra_rng.sample(l3_pool, len(l3_pool) // 2))
        models.append(_planned_child(extra_rng, extra_name(L3_ROOT, True), "l3", L3_ROOT, classes, False, True,
                                     parent=L3_ROOT, corruption=None))
    # A training class needs at least one documented child, or no expert can learn it: the undocumented
    # (test) draw left two of the small lake's 40 L6 classes with none, so its expert knew 38. Each such
    # class gets one more child, documented, from its own stream (tiny and full have none to add).
    for kind, root, classes in (("l6", L6_ROOT, l6_classes), ("l3d", L3D_ROOT, l3d_classes)):
        doc_rng = random.Random(f"probex-lake/{size}/{seed}/{kind}-documented")  # a stream per tree
        doc_name = _name_maker(doc_rng, taken={m.repo_id for m in models})
        documented = {m.classes[0] for m in models if m.kind == kind and m.documented}
        for c in [c for c in classes if c not in documented]:
            models.append(_planned_child(doc_rng, doc_name(root, True), kind, root, (c,), False, True,
                                         parent=root, corruption=None, test_share=0.0))
    families = []
    if spec.families:
        from zoo import families as fam  # it builds on this module's names
        families = [fam.make_plan("llama", seed), fam.make_plan("sd", seed)]
    return Plan(size, seed, mess, models, l3_pool, l6_classes, l6_holdout, lora_init_seed, l3d_classes, l3d_holdout,
                families)


def check_tree_classes(tree: str, training: list[str], holdout: list[str]) -> None:
    """A tree's class names must be usable labels: a blank name, a name given twice or a held-out
    class that is also a training class would each score an expert against the wrong classes
    without any error, so each is refused here (names compare as labels: case and outer spaces
    ignored)."""
    blank = [c for c in [*training, *holdout] if not c.strip()]
    if blank:
        raise ZooError(f"{tree}: class names must not be empty ({len(blank)} blank)")
    for side, names in (("training", training), ("held-out", holdout)):
        keys = [c.strip().lower() for c in names]
        twice = sorted({c for c in keys if keys.count(c) > 1})
        if twice:
            raise ZooError(f"{tree}: {side} class names must be distinct; given twice: {', '.join(twice)}")
    both = sorted({c.strip().lower() for c in training} & {c.strip().lower() for c in holdout})
    if both:
        raise ZooError(f"{tree}: held-out classes must not be training classes; both: {', '.join(both)}")


def _planned_child(rng: random.Random, repo_id: str, kind: str, root: str, classes: tuple, holdout: bool,
                   declared: bool, parent: str, corruption: str | None, test_share: float = TEST_SHARE
                   ) -> PlannedModel:
    """One fine-tune's split and recipe, drawn from `rng` (in a fixed order: seeds give the same lake)."""
    if holdout:
        split = "holdout"
    elif rng.random() < test_share:
        split = "test"
    else:
        split = "val" if is_val(repo_id) else "train"
    rank = rng.choice(RANKS)
    return PlannedModel(
        repo_id, kind, root, parent=parent, classes=classes,
        split=split, documented=split in ("train", "val"), lineage_declared=declared,
        corruption=corruption, seed=rng.randrange(2**31),
        lr=rng.choice(IMAGE_LRS if kind == "image" else TEXT_LRS),
        epochs=rng.choice(IMAGE_EPOCHS if kind == "image" else TEXT_EPOCHS),
        rank=0 if kind == "image" else rank, alpha=0 if kind == "image" else rng.choice((rank, 2 * rank)),
    )


def _class_pool(spec: SizeSpec, seed: int) -> list[wordnet.WordClass]:
    return wordnet.load_class_pool(spec.n_pool, seed, min_lemmas=spec.min_lemmas)


# ----------------------------------------------------------------------------------- building


class _Trainers:
    """Bases and trainers, loaded only when a repo actually has to be written (a resumed, complete
    lake loads nothing)."""

    def __init__(self, plan: Plan, lake: Path):
        self.plan, self.lake, self.spec = plan, lake, SIZES[plan.size]
        self.classes = {c.name: c for c in _class_pool(self.spec, plan.seed)}

    def image_base(self):
        from zoo.image_children import load_image_base
        return load_image_base()

    def text_base(self, root: str):
        from zoo.text_bases import load_text_base
        return load_text_base(root.split("/")[1])

    def base_repo(self, m: PlannedModel) -> tuple[dict, dict]:
        if m.repo_id == IMAGE_ROOT:
            base = self.image_base()
            return base.state, base.config
        base = self.text_base(m.repo_id)
        return base.state_dict_for_lake(), base.config

    def child(self, m: PlannedModel, seed: int) -> TrainedChild:
        if m.kind == "outsider":
            from zoo.image_children import random_image_model
            return random_image_model(seed, num_classes=10)
        if m.kind == "image":
            from zoo.image_children import train_image_child
            init = None if m.parent == IMAGE_ROOT else load_file(hub_repo.repo_dir(self.lake, m.parent) / "model.safetensors")
            return train_image_child(self.image_base(), [fashion_mnist.CLASSES.index(c) for c in m.classes],
                                     seed=seed, lr=m.lr, epochs=m.epochs, init_state=init)
        from zoo.text_children import TextTask, train_text_child
        texts = {"n_train": self.spec.n_train, "n_heldout": self.spec.n_heldout}
        if m.kind == "l3":
            texts["n_train"] = self.spec.l3_n_train or self.spec.n_train
            task = TextTask("subset", classes=[self.classes[c] for c in m.classes], **texts)
        else:  # negatives come from the tree's training classes only, so held-out classes stay unseen
            training = self.plan.l6_classes if m.kind == "l6" else self.plan.l3d_classes
            task = TextTask("detector", classes=[self.classes[m.classes[0]]],
                            negatives=[self.classes[c] for c in training if c != m.classes[0]], **texts)
        return train_text_child(self.text_base(m.root), task, seed=seed, lr=m.lr, epochs=m.epochs,
                                rank=m.rank, lora_init_seed=self.plan.lora_init_seed[m.root],
                                lora_alpha=m.alpha)


def _min_accuracy(m: PlannedModel) -> float:
    """Halfway from chance to perfect: a child below it did not learn its task."""
    chance = 0.5 if m.kind in ("l6", "l3d") else 1 / len(m.classes)
    return chance + (1 - chance) / 2


def _spec(m: PlannedModel, child: TrainedChild | None) -> RepoSpec:
    base = m.parent if m.lineage_declared else None
    if m.kind == "base" and m.root == IMAGE_ROOT:
        return RepoSpec(m.repo_id, "EfficientNet-Lite0 trained on ImageNet-1k.", pipeline_tag="image-classification",
                        tags=["image-classification", "efficientnet", "vision"], datasets=["imagenet-1k"])
    if m.kind == "base":
        return RepoSpec(m.repo_id, "A sentence-transformers model: it maps sentences to a 384-dimensional "
                        "dense vector space.", library_name="sentence-transformers",
                        pipeline_tag="sentence-similarity",
                        tags=["sentence-transformers", "feature-extraction", "sentence-similarity"])
    if m.kind == "outsider":
        return RepoSpec(m.repo_id, "An image classifier.", pipeline_tag="image-classification",
                        tags=["image-classification"], labels=child.labels, documented=False)
    labels = child.labels
    if m.kind == "image":
        return RepoSpec(m.repo_id, "A fine-tuned image classifier.", base_model=base, relation="finetune",
                        pipeline_tag="image-classification", datasets=["fashion_mnist"],
                        tags=["image-classification"] + (["efficientnet"] if base else []), labels=labels,
                        documented=m.documented, accuracy=child.accuracy, eval_dataset="Fashion-MNIST (held-out)")
    return RepoSpec(m.repo_id, "A LoRA adapter for sequence classification.", base_model=base, relation="adapter",
                    library_name="peft", pipeline_tag="text-classification", datasets=["wordnet"],
                    tags=["peft", "lora", "text-classification"], labels=labels, documented=m.documented,
                    accuracy=child.accuracy, eval_dataset="WordNet glosses (held-out)")


def _write(m: PlannedModel, trainers: _Trainers, lake: Path) -> float | None:
    """Train (re-rolling the seed up to MAX_ATTEMPTS times) and write one repo; returns its
    accuracy, or None when no seed learned the task and the repo is left out."""
    if m.kind == "base":
        tensors, config = trainers.base_repo(m)
        hub_repo.write_repo(lake, _spec(m, None), tensors=tensors, config=config, recipe={})
        return None
    for attempt in range(MAX_ATTEMPTS):
        child = trainers.child(m, m.seed + attempt)
        if m.kind == "outsider" or child.accuracy >= _min_accuracy(m):
            break
    else:
        return None
    hub_repo.write_repo(lake, _spec(m, child), tensors=child.tensors, config=child.config,
                        recipe=child.recipe, adapter_config=child.adapter_config, corruption=m.corruption)
    return None if m.kind == "outsider" else round(child.accuracy, 4)


def _prepare_out(out: Path, plan: Plan) -> None:
    """A usable, writable lake folder: new, empty, or holding a lake of this very plan."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out} is a file, not a folder: choose another --out")
    if manifest.exists():
        got = json.loads(manifest.read_text())
        if (got.get("size"), got.get("seed"), got.get("mess")) != (plan.size, plan.seed, asdict(plan.mess)):
            raise ZooError(f"{out} holds a lake built with size={got.get('size')}, seed={got.get('seed')}, "
                           f"mess={got.get('mess')}: choose another --out or delete that folder")
    elif out.exists() and any(out.iterdir()):
        raise ZooError(f"{out} is not empty and holds no lake: choose an empty or new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(manifest, _manifest(plan, trees=None))
    except OSError as e:
        raise ZooError(f"cannot write to {out} ({e.strerror}): choose a writable --out") from None


def _manifest(plan: Plan, trees: list[TreeSummary] | None) -> dict:
    return {"format": 1, "size": plan.size, "seed": plan.seed, "mess": asdict(plan.mess),
            "finished": trees is not None, "trees": [asdict(t) for t in trees or []],
            "n_models": plan.n_repos, "n_planned": plan.n_repos}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _format(m: PlannedModel) -> str:
    """How a trained tree's repo stores its weights (the family trees name their own)."""
    return "peft_lora" if m.kind in ("l3", "l6", "l3d") else "safetensors"


def _ground_truth(models: list[PlannedModel], accuracy: dict[str, float | None],
                  formats: list[str] | None = None, synthetic: bool = False) -> pa.Table:
    """One row per repo; `synthetic` marks trees whose weights were generated, not trained (they
    exercise formats and shapes and claim no accuracy)."""
    return pa.table({
        "repo_id": [m.repo_id for m in models],
        "root": [m.root for m in models],
        "parent": [m.parent for m in models],
        "classes": pa.array([list(m.classes) for m in models], pa.list_(pa.string())),
        "split": pa.array([m.split for m in models], pa.string()),
        "documented": [m.documented for m in models],
        "lineage_declared": [m.lineage_declared for m in models],
        "corrupt": [m.corruption is not None for m in models],
        "corruption": pa.array([m.corruption for m in models], pa.string()),
        "accuracy": pa.array([accuracy[m.repo_id] for m in models], pa.float64()),
        "synthetic": pa.array([synthetic] * len(models), pa.bool_()),
        "format": pa.array(formats or [_format(m) for m in models], pa.string()),
    })


def _summaries(plan: Plan, written: list[PlannedModel], accuracy: dict[str, float | None]) -> list[TreeSummary]:
    out = []
    planned = {m.root for m in plan.models if m.kind == "base"}
    for root, kind, task in ((IMAGE_ROOT, "full", "multilabel"), (L3_ROOT, "LoRA", "multilabel"),
                             (L6_ROOT, "LoRA", "text"), (L3D_ROOT, "LoRA", "text")):
        if root not in planned:
            continue
        accs = [accuracy[m.repo_id] for m in written if m.root == root and m.kind != "base"]
        n_classes = {IMAGE_ROOT: len(fashion_mnist.CLASSES), L3_ROOT: len(plan.l3_pool),
                     L6_ROOT: len(plan.l6_classes) + len(plan.l6_holdout),
                     L3D_ROOT: len(plan.l3d_classes) + len(plan.l3d_holdout)}[root]
        holdout = {L6_ROOT: len(plan.l6_holdout), L3D_ROOT: len(plan.l3d_holdout)}.get(root, 0)
        out.append(TreeSummary(root, kind, task, len(accs), round(sum(accs) / len(accs), 4) if accs else None,
                               min(accs) if accs else None, n_classes, holdout))
    return out


def _worker_init() -> None:
    # One thread per process, two processes: small conv/attention batches gain little from a
    # second thread, and OpenMP threads spin badly when other jobs share the cores (see
    # docs/benchmarks.md). The text trainer honours an explicit OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@functools.cache
def _trainers(size: str, seed: int, mess: Mess, lake: Path) -> _Trainers:
    """One per worker process: its bases and cached features serve every repo it builds."""
    return _Trainers(make_plan(size, seed, mess), lake)


def _holds_threads() -> bool:
    """A library whose background threads a fork would copy mid-operation is loaded here."""
    return any(name in sys.modules for name in ("lancedb", "lance", "distributed"))


def _pool_context():
    """fork where the platform has it: workers then inherit what `_preload` loaded."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _preload(size: str, seed: int, mess: Mess, lake: Path, todo: list[PlannedModel]) -> None:
    """Load once, in this process, what the repos still to build share: the plan and class pool,
    the bases, the image pool's features. Forked workers inherit it; each spawned worker would
    compute it again. Two threads overlap the image features with the L3 ONNX
    conversion. Torch runs single-threaded here: a process that has started OpenMP threads must
    not fork (the children's OpenMP would wait on threads that no longer exist)."""
    from concurrent.futures import ThreadPoolExecutor

    trainers = _trainers(size, seed, mess, lake)
    kinds = {m.kind for m in todo}
    roots = {m.repo_id for m in todo if m.kind == "base"}
    loads = []
    if "image" in kinds or IMAGE_ROOT in roots:
        loads.append(trainers.image_base)
    bases = {}  # L3D's root is L3's weights: load them once
    for root, kind in ((L3_ROOT, "l3"), (L6_ROOT, "l6"), (L3D_ROOT, "l3d")):
        if kind in kinds or root in roots:
            bases.setdefault(root.split("/")[1], functools.partial(trainers.text_base, root))
    loads += bases.values()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads across a fork
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(load) for load in loads]:
                done.result()
    finally:
        torch.set_num_threads(threads)


def _build_one(size: str, seed: int, mess: Mess, lake: Path, index: int) -> float | None:
    trainers = _trainers(size, seed, mess, lake)
    return _write(trainers.plan.models[index], trainers, lake)


def _first_of_each_tree(plan: Plan, limit: int) -> list[PlannedModel]:
    """The roots and, per tree, its first `limit` in-distribution and first `limit` held-out
    children (a chain child only with its parent): a scaled-down lake of the very same plan."""
    taken: dict[tuple[str | None, bool], int] = {}
    keep: list[PlannedModel] = []
    kept: set[str] = set()
    for m in plan.models:
        key = (m.root, m.split == "holdout")
        if m.kind == "base" or (m.kind != "outsider" and taken.get(key, 0) < limit
                                and (m.parent == m.root or m.parent in kept)):
            taken[key] = taken.get(key, 0) + (m.kind != "base")
            keep.append(m)
            kept.add(m.repo_id)
    return keep


def build_lake(out: Path, size: str, seed: int = 0, progress: bool = True, mess: bool = True,
               workers: int = WORKERS, limit: int | None = None, **mess_flags) -> LakeSummary:
    """Build (or finish building) the lake of (size, seed) in `out` with `workers` processes.
    `mess=False` turns every kind of mess off; keyword flags set single fields of `Mess`
    (undeclared, chains, corrupt, outsiders). `limit` builds only the roots and the first `limit`
    in-distribution and `limit` held-out children of each tree (no outsiders): a lake too large
    to build in a test is checked and its cost per child measured that way; it stays unfinished,
    and a later build without a limit completes it."""
    started = time.perf_counter()
    out = Path(out).absolute()
    unknown = set(mess_flags) - {f.name for f in fields(Mess)}
    if unknown:
        raise ZooError(f"unknown mess flag(s) {', '.join(sorted(unknown))}: use {', '.join(f.name for f in fields(Mess))}")
    plan = make_plan(size, seed, replace(Mess() if mess else Mess.none(), **mess_flags))
    if limit is not None and limit < 1:
        raise ZooError(f"limit must be a positive number of children per tree, not {limit}")
    fashion_mnist.load_split("train")  # fail on missing data before anything is written
    was_finished = lake_is_complete(out)  # a limited build leaves a finished lake finished
    _prepare_out(out, plan)
    if _holds_threads() and _pool_context().get_start_method() == "fork":
        # LanceDB's runtime threads make a fork unsafe: build from a fresh process, which forks.
        # Bad input has failed above, in this process, with its own error.
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as fresh:
            return fresh.submit(build_lake, out, size, seed, progress, mess, workers, limit, **mess_flags).result()
    hub_repo.clean_partials(out)

    index = {m.repo_id: i for i, m in enumerate(plan.models)}
    accuracy: dict[str, float | None] = {}
    todo = []
    wanted = None if limit is None else {m.repo_id for m in _first_of_each_tree(plan, limit)}
    for m in plan.models:
        path = hub_repo.repo_dir(out, m.repo_id)
        if path.exists():
            accuracy[m.repo_id] = None if m.kind in ("base", "outsider") else hub_repo.read_accuracy(path)
        elif wanted is None or m.repo_id in wanted:
            todo.append(m)
    # a chain child starts from its parent's weights on disk: it waits for the parent's repo
    pending = {m.repo_id for m in todo}
    waiting = {m.repo_id: m for m in todo if m.kind == "image" and m.parent in pending and m.parent != IMAGE_ROOT}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), disable=not progress) as bar:
        total = len(accuracy) + len(todo)
        task = bar.add_task(f"lake {size}", total=total, completed=total - len(todo))
        if todo:
            context = _pool_context()
            if context.get_start_method() == "fork":
                _preload(size, seed, plan.mess, out, todo)
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
                def submit(m: PlannedModel):
                    return pool.submit(_build_one, size, seed, plan.mess, out, index[m.repo_id])
                running = {submit(m): m for m in todo if m.repo_id not in waiting}
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        m = running.pop(future)
                        accuracy[m.repo_id] = future.result()
                        bar.advance(task)
                        for child in [c for c in waiting.values() if c.parent == m.repo_id]:
                            running[submit(waiting.pop(child.repo_id))] = child
            for m in waiting.values():  # the parent never learned its task: no chain to continue
                accuracy[m.repo_id] = None
    # a child that no seed could teach its task has no folder and is left out
    written = [m for m in plan.models if hub_repo.repo_dir(out, m.repo_id).exists()]

    truth = _ground_truth(written, accuracy)
    trees = _summaries(plan, written, accuracy)
    if plan.families:
        from zoo import families

        for family in plan.families:  # repos already written are kept, as above
            families.write_tree(out, family)
        truth = pa.concat_tables([truth, families.ground_truth(plan.families)])
        trees += families.summaries(plan.families)
    gt_tmp = out / (GROUND_TRUTH + ".tmp")
    pq.write_table(truth, gt_tmp)
    os.replace(gt_tmp, out / GROUND_TRUTH)
    seconds = round(time.perf_counter() - started, 2)
    doc = _manifest(plan, trees)
    # how long the run that finished the lake took, and whether it resumed an earlier one
    doc.update(n_models=truth.num_rows, seconds=seconds, resumed=len(todo) < len(accuracy))
    if limit is not None:
        doc.update(finished=was_finished, limit=limit, built_now=len(todo))
    _write_json(out / MANIFEST, doc)
    return LakeSummary(str(out), size, seed, trees, truth.num_rows, sum(t.n_models for t in trees), seconds,
                       folder_bytes(out))


def lake_is_complete(out: Path) -> bool:
    """A finished lake that holds every model its plan has now. A lake finished before its plan grew
    (models added from their own streams, e.g. the documented L6 children) reads as unfinished, so the
    next build resumes it and writes only what is new."""
    manifest = Path(out) / MANIFEST
    if not manifest.exists():
        return False
    got = json.loads(manifest.read_text())
    if not got.get("finished"):
        return False
    try:
        plan = make_plan(got["size"], got["seed"], Mess(**got["mess"]))
    except (KeyError, TypeError, ZooError):
        return False
    return got.get("n_planned") == plan.n_repos


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
