"""Turn a repo's raw parts (card bytes, config bytes, file list) into a `ModelRecord`.

Both sources call these functions on the same bytes, so a Hub mirror and the folder it serves give
identical records. Nothing here raises for bad data: each problem becomes a (status, reason) pair
whose reason names the file, what was wrong and what to do. Reasons never mention local paths or
URLs, so they do not depend on which source read the repo.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.utils import validate_repo_id

from probex_core.lineage import repo_key
from storage.records import MODEL_INDEX, ModelRecord, RepoFile, no_safetensors_reason, weight_files

CARD_FILE = "README.md"
CONFIG_FILE = "config.json"

# Real cards are kilobytes (a long model-index is ~100 KiB); anything larger is refused before it
# is read. With libyaml, the worst case (1 MiB of YAML) parses in about a second.
MAX_CARD_BYTES = 1 << 20
# An id2label of ImageNet-21k is ~1 MiB of JSON; 16 MiB leaves room and still bounds memory.
MAX_CONFIG_BYTES = 16 << 20


class Status:
    """Values of `ModelRecord.status` that sources produce."""

    OK = "ok"
    BAD_REPO_ID = "bad_repo_id"  # the id itself is unsafe: nothing else about the repo is read
    BAD_CARD = "bad_card"  # README.md front matter unreadable or with invalid lineage fields
    NO_CONFIG = "no_config"  # no config.json: labels unknown, lineage still usable
    BAD_CONFIG = "bad_config"  # config.json present but unreadable
    NOT_FOUND = "not_found"  # listed, then gone (deleted/private) when its details were fetched
    GATED = "gated"  # listed, but its files need an accepted licence / a token with access
    # weights only as pickles (never unpickled) or GGUF/ONNX: recorded with lineage, never extracted
    NO_SAFETENSORS = "no_safetensors"


@dataclass
class Problems:
    """Problems found while reading one repo; the first decides the status, all go in the reason."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, status: str, reason: str) -> None:
        self.items.append((status, reason))

    @property
    def status(self) -> str:
        return self.items[0][0] if self.items else Status.OK

    @property
    def reason(self) -> str | None:
        return "; ".join(r for _, r in self.items) or None


def repo_id_problem(repo_id: object) -> str | None:
    """Why `repo_id` is unsafe to use as a path or URL part, or None when it is fine.

    Uses huggingface_hub's own rules ("name" or "org/name"; no "..", "--", leading "/", odd
    characters; at most 96 characters), so we accept exactly what the Hub accepts.
    """
    try:
        validate_repo_id(repo_id)  # type: ignore[arg-type]
    except HFValidationError as err:
        return f"invalid repo id {str(repo_id)[:120]!r}: {err}"
    if not repo_id:
        return "empty repo id"
    return None


# What people write around a repo id in `base_model` / `base_model_name_or_path`: the model's page
# URL (the Hub's own "Use this model" links) and a revision (`@<sha>`, `/tree/<rev>`). A revision
# is not part of the id: the Hub's model tree links repos, not commits.
_HUB_URL = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/", re.IGNORECASE)
_REVISION = re.compile(r"(?:/(?:tree|blob|resolve|commit)/.*|@[^/]*)$")


def repo_ref(text: str) -> str:
    """The repo id a lineage field names: `https://huggingface.co/Org/Name/tree/main` and
    `Org/Name@abc123` both give `Org/Name` (the writer's spelling kept; compare with `repo_key`).
    Not validated: `repo_id_problem` says whether the result is an id."""
    ref = _HUB_URL.sub("", text.strip())
    return _REVISION.sub("", ref).rstrip("/")


def repo_refs(values: list[str]) -> list[str]:
    """`repo_ref` of each, empty ones dropped, de-duplicated as the Hub compares ids, in order."""
    out: dict[str, str] = {}
    for v in values:
        if ref := repo_ref(v):
            out.setdefault(repo_key(ref), ref)
    return list(out.values())


def _one_line(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def card_too_large(size: int) -> str | None:
    if size > MAX_CARD_BYTES:
        return (
            f"{CARD_FILE} is {size} bytes, over the {MAX_CARD_BYTES} byte limit; not parsed "
            "(move long text out of the card or shorten its YAML front matter)"
        )
    return None


MAX_TAGS = 1000
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Nesting deeper than this is refused: PyYAML composes recursively (seconds for a 10 KB "[[[[...").
MAX_YAML_DEPTH = 64
_OPEN = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken, yaml.BlockSequenceStartToken,
         yaml.BlockMappingStartToken)
_CLOSE = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


def _check_yaml_cost(block: str) -> None:
    """Refuse, before composing, YAML whose parse cost is not bounded by its size: anchors/aliases
    (`&a [*b, *b, ...]` chains expand exponentially: "billion laughs") and deep nesting.
    Scanning tokens with libyaml is linear and fast."""
    depth = 0
    for token in yaml.scan(block, Loader=_SAFE_LOADER):
        if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
            raise ValueError(
                "YAML front matter uses anchors/aliases (& / *), which are refused to bound "
                "parsing cost; write the values out"
            )
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"YAML front matter nests deeper than {MAX_YAML_DEPTH} levels; flatten it")
        elif isinstance(token, _CLOSE):
            depth -= 1


def card_from_bytes(raw: bytes) -> tuple[ModelCardData, str | None]:
    """Parse a model card the way huggingface_hub's `ModelCard` / `metadata_load` do (its
    `REGEX_YAML_BLOCK`, a YAML safe load, `ModelCardData(..., ignore_metadata_errors=True)`), after
    bounding the cost. Returns (card data, problem); on a problem the card data is empty.

    Two deliberate differences, both about cost: the safe load uses libyaml (`CSafeLoader`, same
    results, ~10x faster than the pure-Python loader `ModelCard` uses: 1 MiB of YAML in ~1 s, not
    ~10 s), and `tags` is capped because `ModelCardData` de-duplicates it in quadratic time.
    """
    if problem := card_too_large(len(raw)):
        return ModelCardData(), problem
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return ModelCardData(), f"{CARD_FILE} is not UTF-8 ({_one_line(err)}); re-save it as UTF-8"
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return ModelCardData(), None  # no front matter: nothing declared
    block = match.group(2)
    try:
        _check_yaml_cost(block)
        data = yaml.load(block, Loader=_SAFE_LOADER) or {}
    except ValueError as err:
        return ModelCardData(), f"{CARD_FILE}: {err}"
    except (yaml.YAMLError, RecursionError) as err:
        return ModelCardData(), f"{CARD_FILE} front matter unreadable: {_one_line(err)}; fix the YAML"
    if not isinstance(data, dict):
        return ModelCardData(), f"{CARD_FILE} front matter must be a YAML mapping, got {type(data).__name__}"
    tags = data.get("tags")
    if isinstance(tags, list) and len(tags) > MAX_TAGS:
        return ModelCardData(), f"{CARD_FILE} declares {len(tags)} tags, over the {MAX_TAGS} limit; trim them"
    try:
        # ignore_metadata_errors: a malformed model-index must not hide the lineage fields.
        return ModelCardData(**data, ignore_metadata_errors=True), None
    except (TypeError, ValueError) as err:  # e.g. non-string keys
        return ModelCardData(), f"{CARD_FILE} front matter unusable: {_one_line(err)}; fix the YAML"


@dataclass
class CardFields:
    base_model: list[str] = field(default_factory=list)
    base_model_relation: str | None = None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    library_name: str | None = None
    labels: dict[str, str] | None = None  # the card's own class names, for repos without config.json


def _scalar(value: object) -> str | None:
    # Values travel through JSON on the Hub; str() makes a YAML date the same string both ways.
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def str_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and not isinstance(v, (dict, list))]
    return [str(value)]


def card_labels(data: ModelCardData) -> dict[str, str] | None:
    """Class names a card declares in its front matter, as `id2label`: `labels: [cat, dog]` (in
    head order) or `id2label: {0: cat, 1: dog}`. Adapter repos and diffusers pipelines usually ship
    no config.json, so their card is where their classes can be read; config.json wins when both."""
    labels = data.get("id2label")
    if isinstance(labels, dict) and labels:
        return {str(k): str(v) for k, v in labels.items() if not isinstance(v, (dict, list))} or None
    labels = data.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if isinstance(labels, list) and labels:
        return {str(i): str(v) for i, v in enumerate(labels) if not isinstance(v, (dict, list))} or None
    return None


def card_fields(data: ModelCardData, problems: Problems) -> CardFields:
    """The card fields a record keeps. A `base_model` that is not a repo id or a list of repo ids
    is a `bad_card` problem (lineage is what places a model; a guess would misplace it)."""
    fields = CardFields(
        base_model_relation=(_scalar(data.get("base_model_relation")) or "").strip().lower() or None,
        license=_scalar(data.get("license")),
        datasets=str_list(data.get("datasets")),
        tags=str_list(data.get("tags")),
        pipeline_tag=_scalar(data.get("pipeline_tag")),
        library_name=_scalar(data.get("library_name")),
        labels=card_labels(data),
    )
    declared = data.get("base_model")
    if declared is None:
        return fields
    parents = [declared] if isinstance(declared, str) else declared
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        problems.add(
            Status.BAD_CARD,
            f"base_model must be a repo id or a list of repo ids, got {type(declared).__name__} "
            f"{str(declared)[:80]!r}; lineage ignored",
        )
        return fields
    cleaned = repo_refs(parents)
    bad = [p for p in cleaned if repo_id_problem(p)]
    if bad:
        problems.add(Status.BAD_CARD, f"base_model has invalid repo ids {bad[:3]!r}; lineage ignored")
        return fields
    fields.base_model = cleaned
    return fields


ADAPTER_CONFIG_FILE = "adapter_config.json"
MAX_ADAPTER_CONFIG_BYTES = 1 << 20  # PEFT writes ~1 KiB; a rank_pattern of every module stays far below


def adapter_config_base(raw: bytes) -> str | None:
    """The base model a PEFT `adapter_config.json` names (`base_model_name_or_path`), as a repo id;
    None when it names none, or a local path (`/content/llama`, `../base`) rather than a repo.
    The Hub takes an adapter's lineage from this field when the card declares none."""
    if len(raw) > MAX_ADAPTER_CONFIG_BYTES:
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # extraction reads it again and says what is wrong with it
    value = doc.get("base_model_name_or_path") if isinstance(doc, dict) else None
    if not isinstance(value, str):
        return None
    ref = repo_ref(value)
    return ref if ref and not repo_id_problem(ref) else None


def config_labels(raw: bytes, problems: Problems) -> dict[str, str] | None:
    """`id2label` from config.json bytes (keys and values as strings), or None when absent."""
    if len(raw) > MAX_CONFIG_BYTES:
        problems.add(Status.BAD_CONFIG, f"{CONFIG_FILE} is {len(raw)} bytes, over the {MAX_CONFIG_BYTES} byte limit")
        return None
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        problems.add(Status.BAD_CONFIG, f"{CONFIG_FILE} is not valid JSON ({_one_line(err)}); fix or regenerate it")
        return None
    if not isinstance(config, dict):
        problems.add(Status.BAD_CONFIG, f"{CONFIG_FILE} must be a JSON object, got {type(config).__name__}")
        return None
    labels = config.get("id2label")
    if labels is None:
        return None
    if not isinstance(labels, dict):
        problems.add(Status.BAD_CONFIG, f"{CONFIG_FILE} id2label must be an object, got {type(labels).__name__}")
        return None
    return {str(k): str(v) for k, v in labels.items()}


def config_expected(files: list[str]) -> bool:
    """Whether a repo of these files should have a config.json: adapter repos (PEFT, diffusers,
    kohya) and diffusers pipelines (model_index.json) ship none on the Hub, and that is normal."""
    if MODEL_INDEX in files:
        return False
    layout = weight_files(files)
    return not (layout.is_adapter or layout.kind == "single")


def no_config(problems: Problems) -> None:
    problems.add(Status.NO_CONFIG, f"no {CONFIG_FILE} in the repo: labels unknown (lineage still used)")


def config_too_large(size: int, problems: Problems) -> bool:
    if size > MAX_CONFIG_BYTES:
        problems.add(Status.BAD_CONFIG, f"{CONFIG_FILE} is {size} bytes, over the {MAX_CONFIG_BYTES} byte limit")
        return True
    return False


def bare_record(
    repo_id: str, sha: str, created_at: datetime | None, last_modified: datetime | None, status: str, reason: str
) -> ModelRecord:
    """A record for a repo whose contents were not read (bad id, gone, gated)."""
    return ModelRecord(
        repo_id=repo_id, sha=sha, created_at=created_at, last_modified=last_modified, status=status, reason=reason
    )


def assemble(
    *,
    repo_id: str,
    sha: str,
    created_at: datetime | None,
    last_modified: datetime | None,
    files: list[RepoFile],
    card: CardFields,
    id2label: dict[str, str] | None,
    problems: Problems,
) -> ModelRecord:
    paths = [f.path for f in files]
    # normal for adapters and pipelines, and no loss when the card names the labels
    if card.labels or not config_expected(paths):
        problems.items = [p for p in problems.items if p[0] != Status.NO_CONFIG]
    if reason := no_safetensors_reason(paths):
        # first: it decides the status (a missing config.json matters less than having no weights)
        problems.items.insert(0, (Status.NO_SAFETENSORS, reason))
    return ModelRecord(
        repo_id=repo_id,
        sha=sha,
        created_at=created_at,
        last_modified=last_modified,
        base_model=card.base_model,
        base_model_relation=card.base_model_relation,
        license=card.license,
        datasets=card.datasets,
        tags=card.tags,
        pipeline_tag=card.pipeline_tag,
        library_name=card.library_name,
        id2label=id2label or card.labels,
        files=sorted(files, key=lambda f: f.path),
        status=problems.status,
        reason=problems.reason,
    )
