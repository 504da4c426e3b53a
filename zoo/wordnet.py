"""WordNet noun classes for the text trees: a pool of disjoint, meaningful classes, each with
"lemma: definition" examples drawn from the hyponym closure of one synset.

Parses /usr/share/wordnet/data.noun (Debian `wordnet-base`) directly. Each data line is
    offset lex_filenum ss_type w_cnt(hex) [word lex_id]*w_cnt p_cnt [ptr offset pos src/tgt]*p_cnt | gloss
and we only need the words, the hyponym pointers ('~' and instance hyponyms '~i') and the gloss.

A class is a synset whose closure (itself + all hyponyms, transitively) holds between `min_lemmas`
and `max_lemmas` synsets; every synset of the closure gives one example text, its first lemma and
its definition ("poodle: an intelligent dog with a heavy curly solid-colored coat"). The candidate
classes are fixed and mutually disjoint (no shared synsets, hence no ancestor/descendant pairs and
no shared texts); a seed only shuffles their order, so a smaller request is a prefix of a larger
one with the same seed.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from zoo.types import ZooDataError

WORDNET_DIR = Path("/usr/share/wordnet")
HYPONYM_POINTERS = {"~", "~i"}  # hyponym, instance hyponym (e.g. "city" -> "Paris")
# Lexicographer files whose synsets make readable classes: things, beings, places, acts, diseases.
# Left out: Tops, attribute, cognition, feeling, motive, phenomenon, possession, process, quantity,
# relation, shape, time (classes like "set", "use", "degree" that no one would fine-tune a model on).
CLASS_LEX_FILES = {
    4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 8: "noun.body", 10: "noun.communication",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 17: "noun.object", 18: "noun.person",
    20: "noun.plant", 26: "noun.state", 27: "noun.substance",
}
# "amphibian genus", "fungus family": their examples are Latin taxon names, not a concept
TAXON_WORDS = ("genus", "family", "order", "phylum")



@dataclass(frozen=True)
class Synset:
    offset: int
    lex_file: int  # lexicographer file number, see CLASS_LEX_FILES
    lemmas: tuple[str, ...]  # as written in WordNet, underscores for spaces
    hyponyms: tuple[int, ...]  # offsets of direct (instance) hyponyms
    definition: str  # the gloss without its quoted usage examples

    @property
    def text(self) -> str:
        return f"{self.lemmas[0].replace('_', ' ')}: {self.definition}"


@dataclass
class WordClass:
    name: str  # first lemma of the root synset, underscores -> spaces, e.g. "dog"
    offset: int  # WordNet 3.0 noun synset offset of the class root
    texts: list[str]  # one "lemma: definition" example per synset of the hyponym closure


def _parse_data_line(line: str) -> Synset:
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    lemmas = tuple(fields[4 : 4 + 2 * n_words : 2])
    at = 4 + 2 * n_words
    pointers = fields[at + 1 : at + 1 + 4 * int(fields[at])]  # 4 fields per pointer
    hyponyms = tuple(
        int(pointers[i + 1]) for i in range(0, len(pointers), 4) if pointers[i] in HYPONYM_POINTERS
    )
    # the gloss reads 'definition; "usage example"; "another"': keep the definition only
    definition = gloss.split('"')[0].strip().rstrip(";").strip()
    return Synset(int(fields[0]), int(fields[1]), lemmas, hyponyms, definition)


def _read_lines(name: str) -> list[str]:
    path = WORDNET_DIR / name
    if not path.exists():
        raise ZooDataError(
            f"WordNet file {path} not found: install it with `apt-get install wordnet-base`"
        )
    with path.open(encoding="utf-8") as f:
        return [line for line in f if not line.startswith("  ")]  # the license header is indented


@functools.cache
def load_synsets() -> dict[int, Synset]:
    """offset -> Synset for all ~82k noun synsets; parsed once per process."""
    return {s.offset: s for s in map(_parse_data_line, _read_lines("data.noun"))}


@functools.cache
def _first_senses() -> dict[str, int]:
    """lowercase lemma -> offset of its most frequent noun sense. index.noun lines read
    'lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt [offset]*synset_cnt',
    offsets ordered by frequency."""
    senses = {}
    for line in _read_lines("index.noun"):
        fields = line.split()
        senses[fields[0]] = int(fields[-int(fields[2])])
    return senses


def _closures(synsets: dict[int, Synset], max_size: int) -> dict[int, frozenset[int] | None]:
    """offset -> its hyponym closure (itself included), or None once it exceeds max_size.
    Capping keeps this cheap: the huge closures near "entity" are never materialised."""
    memo: dict[int, frozenset[int] | None] = {}

    def closure(offset: int) -> frozenset[int] | None:
        if offset not in memo:
            members = {offset}
            for child in synsets[offset].hyponyms:
                sub = closure(child)
                if sub is None or len(members | sub) > max_size:
                    members = None
                    break
                members |= sub
            memo[offset] = None if members is None else frozenset(members)
        return memo[offset]

    for offset in synsets:
        closure(offset)
    return memo


def _is_class_root(synset: Synset, first_senses: dict[str, int]) -> bool:
    name = synset.lemmas[0]
    return (
        synset.lex_file in CLASS_LEX_FILES
        and not any(word in name for word in TAXON_WORDS)
        # the name must mean this synset first: "set" or "bass" as a label would mislead
        and first_senses.get(name.lower()) == synset.offset
    )


@functools.cache
def _candidate_classes(min_lemmas: int, max_lemmas: int) -> tuple[WordClass, ...]:
    """All disjoint classes, in a fixed seed-independent order. Greedy, smallest closure first:
    specific classes ("hound", "citrus") win over their ancestors, which then overlap and drop
    out, so the pool holds as many classes as the size bounds allow."""
    synsets, first_senses = load_synsets(), _first_senses()
    closures = _closures(synsets, max_lemmas)
    roots = sorted(
        (len(members), offset)
        for offset, members in closures.items()
        if members is not None
        and len(members) >= min_lemmas
        and _is_class_root(synsets[offset], first_senses)
    )
    taken: set[int] = set()
    classes = []
    for _, offset in roots:
        if taken.isdisjoint(closures[offset]):
            taken |= closures[offset]
            texts = list(dict.fromkeys(synsets[m].text for m in sorted(closures[offset])))
            classes.append(WordClass(synsets[offset].lemmas[0].replace("_", " "), offset, texts))
    return tuple(c for c in classes if len(c.texts) >= min_lemmas)


def load_class_pool(
    n_classes: int, seed: int, min_lemmas: int = 40, max_lemmas: int = 400
) -> list[WordClass]:
    """`n_classes` disjoint WordNet classes, each with min_lemmas..max_lemmas example texts (one
    per synset of the class's hyponym closure). Deterministic for a seed; for one seed, a smaller
    request returns a prefix of a larger one. About 280 classes exist with the defaults."""
    candidates = list(_candidate_classes(min_lemmas, max_lemmas))
    if n_classes > len(candidates):
        raise ValueError(
            f"asked for {n_classes} WordNet classes but only {len(candidates)} have "
            f"{min_lemmas}..{max_lemmas} examples: lower min_lemmas or raise max_lemmas"
        )
    random.Random(seed).shuffle(candidates)
    return candidates[:n_classes]
