"""The `probex` command. Sub-commands are thin: parse, call a flow/task/query, print.

Conventions (ARCHITECTURE.md): every sub-command takes `--home`; human output is a rich table on
stdout; `--json` prints exactly one JSON document on stdout with progress and logs on stderr; a
user mistake exits non-zero with one line that says what to do.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from probex_core.errors import ProbexError
from probex_core.settings import Settings, SettingsError, configure

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
zoo_app = typer.Typer(no_args_is_help=True, help="Build the bundled demo model lake.")
app.add_typer(zoo_app, name="zoo")

out = Console()  # stdout: tables, or the one JSON document
err = Console(stderr=True)  # progress, logs, errors

HomeOpt = typer.Option(None, "--home", help="Home folder (default: $PROBEX_HOME or ./.probex).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def fail(message: object, code: int = 1):
    """One line on stderr, never a stack trace; user text is escaped, not read as rich markup."""
    err.print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_for(home: Optional[Path], **overrides) -> Settings:
    try:
        return configure(home, **overrides)
    except SettingsError as e:
        fail(e, 2)


def run_command(fn: Callable[[], object]) -> object:
    """Run a command body; a ProbexError or a bad setting becomes one line on stderr, exit 1."""
    try:
        return fn()
    except (ProbexError, SettingsError) as e:
        fail(e)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def to_json(doc: dict) -> str:
    """Strict JSON, which jq and scheduled jobs in any language read: a NaN (e.g. the mAP of a test
    split where no class is both present and absent) is written as null."""
    return json.dumps(_finite(doc), indent=2, default=str, allow_nan=False)


def emit(doc: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    if as_json:
        sys.stdout.write(to_json(doc) + "\n")
    else:
        render(doc)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    """Cells are data (repo ids, labels, card fields, user queries): escaped, never markup. Long
    cells fold onto more lines instead of being cut, so an 80-column log stays readable."""
    t = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for c in columns:
        t.add_column(escape(c), overflow="fold")
    for r in rows:
        t.add_row(*[escape(_fmt(v)) for v in r])
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v[:5])
    return str(v)


@contextmanager
def progress_bar(label: str):
    """A rich progress bar on stderr; yields a callback to advance it by one item."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as p:
        task = p.add_task(label, total=None)
        yield lambda *_: p.advance(task)


# -- zoo ----------------------------------------------------------------------------------------
@zoo_app.command("build")
def zoo_build(
    size: str = typer.Option("small", "--size", help="tiny | small | full"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Lake folder (default: HOME/lake)."),
    seed: int = typer.Option(0, "--seed"),
    no_mess: bool = typer.Option(False, "--no-mess", help="No undeclared lineage, chains, corrupt files or outsiders."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Build a Hub-shaped lake of real fine-tunes of real base models (resumable)."""
    from zoo.build import build_lake

    s = settings_for(home)
    target = out_dir or s.lake
    summary = run_command(lambda: build_lake(Path(target), size=size, seed=seed, progress=True,
                                             mess=not no_mess))
    emit(summary.to_dict(), as_json, render_lake_summary)


def render_lake_summary(doc: dict) -> None:
    rows = [
        [t["root"], t["kind"], t["task"], t["n_models"], t["mean_accuracy"], t["min_accuracy"],
         t.get("n_holdout_classes")]
        for t in doc["trees"]
    ]
    out.print(table(f"lake {doc['out']} ({doc['size']}, seed {doc['seed']})",
                    ["tree root", "fine-tune", "task", "models", "mean acc", "min acc", "held-out classes"],
                    rows))
    out.print(f"{doc['n_models']} models, {doc['bytes_on_disk'] / 2**20:.1f} MiB, "
              f"built in {doc['seconds']:.1f} s")


# -- pipeline steps -----------------------------------------------------------------------------
def parse_date(value: Optional[str], flag: str):
    if value is None:
        return None
    from datetime import datetime, timezone

    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise ProbexError(f"{flag} {value!r} is not a date; use YYYY-MM-DD or an ISO timestamp") from None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def split_list(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


@app.command()
def crawl(
    source: Optional[str] = typer.Option(None, "--source", help="A lake folder, `hub`, or `hub:<endpoint>` (default: HOME/lake)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only models modified at or after (default: the watermark)."),
    until: Optional[str] = typer.Option(None, "--until", help="Only models modified before."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1),
    all_: bool = typer.Option(False, "--all", help="Re-list everything, ignoring the watermark."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """List models, place them in Model Trees, and record them in the catalog."""
    from tasks.pipeline import crawl_step

    s = settings_for(home)
    doc = run_command(lambda: crawl_step(s, source or str(s.lake), parse_date(since, "--since"),
                                         parse_date(until, "--until"), limit, incremental=not all_))
    emit(doc, as_json, render_crawl)


def render_hub(hub: dict | None, step: str) -> None:
    """The step's Hub requests (a table of its own: the step's table is full at 80 columns):
    what rate-limit pressure the run met. Nothing for a step that made none (a local lake)."""
    if not hub or not hub["requests"]:
        return
    out.print(table(f"{step}: Hub requests", ["requests", "api", "resolvers", "retries", "429s",
                                              "retry wait s", "limiter wait s"],
                    [[hub["requests"], hub["api"], hub["resolvers"], hub["retries"], hub["rate_limited"],
                      hub["retry_wait_s"], hub["limiter_wait_s"]]]))


def render_crawl(doc: dict) -> None:
    out.print(table(f"crawl {doc['source']}", ["seen", "new", "changed", "unchanged", "re-placed",
                                                "routed by weights", "unassigned", "errors", "seconds"],
                    [[doc["seen"], doc["new"], doc["changed"], doc["unchanged"], doc["replaced"],
                      doc["routed"], doc["unassigned"], len(doc["errors"]), doc["seconds"]]]))
    render_hub(doc.get("hub"), "crawl")
    if doc["per_tree"]:
        out.print(table("models per tree", ["tree", "models"], sorted(doc["per_tree"].items())))
    if doc["errors"]:
        out.print(table("not readable", ["repo", "status", "reason"],
                        [[e["repo_id"], e["status"], e["reason"]] for e in doc["errors"][:20]]))


@app.command()
def trees(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """List the Model Trees with their model counts and experts."""
    from tasks.pipeline import catalog_for

    s = settings_for(home)
    rows = run_command(lambda: catalog_for(s, create=False).table("trees").to_arrow().to_pylist())
    cols = ["tree_id", "n_models", "n_finetune", "n_adapter", "n_other", "task", "layer", "expert_version"]
    doc = {"trees": [{c: r.get(c) for c in cols} for r in sorted(rows, key=lambda r: -r["n_models"])]}
    emit(doc, as_json, lambda d: out.print(table("trees", cols, [[t[c] for c in cols] for t in d["trees"]])))


@app.command()
def extract(
    tree: Optional[list[str]] = typer.Option(None, "--tree", help="Only this tree (repeatable)."),
    layers: Optional[str] = typer.Option(None, "--layers", help=(
        "Comma-separated layer names, as the tree's root names its tensors "
        "(e.g. model.layers.3.self_attn.q_proj.weight; default: the tree's plan).")),
    candidates: bool = typer.Option(False, "--candidates", help="All candidate layers even when an expert has chosen one."),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="An existing Dask scheduler."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="LocalCluster workers."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Read each model's layers (only their bytes) into Parquet shards, on Dask."""
    from tasks.pipeline import extract_step

    s = settings_for(home, dask_address=dask_address, dask_workers=workers)
    with progress_bar("extracting") as tick:
        doc = run_command(lambda: extract_step(s, tree, split_list(layers),
                                               "candidates" if candidates else "auto", on_result=tick))
    emit(doc, as_json, render_extract)


def render_extract(doc: dict) -> None:
    out.print(table("extract", ["models", "extracted", "skipped", "quarantined", "tensors", "MB read",
                                "read / needed", "read / in files", "seconds", "workers"],
                    [[doc["models"], doc["extracted"], doc["skipped"], len(doc["quarantined"]), doc["tensors"],
                      doc["bytes_read"] / 2**20,
                      doc["bytes_read"] / doc["bytes_needed"] if doc["bytes_needed"] else None,
                      doc["bytes_ratio"], doc["seconds"], doc["workers"]]]))
    render_hub(doc.get("hub"), "extract")
    if doc["quarantined"]:
        out.print(table("quarantined", ["repo", "reason"], [[q["repo_id"], q["reason"]] for q in doc["quarantined"]]))


@app.command()
def train(
    tree: Optional[list[str]] = typer.Option(None, "--tree", help="Only this tree (repeatable)."),
    all_: bool = typer.Option(False, "--all", help="Every tree (the default when no --tree is given)."),
    layers: str = typer.Option("auto", "--layers", help="`auto` (sweep the candidates) or comma-separated names."),
    sweep: bool = typer.Option(False, "--sweep", help="Also run the paper's exhaustive sweep (slower) to compare."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Train one ProbeX expert per tree; a new expert is promoted only if not worse on validation."""
    from tasks.pipeline import train_step

    s = settings_for(home)
    chosen = None if layers == "auto" else split_list(layers)
    strategies = ("sweep", "fast") if sweep else ("fast",)
    doc = run_command(lambda: train_step(s, None if all_ else tree, chosen, strategies))
    emit(doc, as_json, render_train)


def render_train(doc: dict) -> None:
    rows = []
    for t, r in doc["trees"].items():
        main = r["val"].get("accuracy", r["val"].get("top1")) if r["val"] else None
        rows.append([t, r["task"], r["layer"], r["n_train"], r["n_val"], main, r["params"],
                     r["train_seconds"], r["version"], "yes" if r["promoted"] else "no", r["skipped"]])
    out.print(table("experts", ["tree", "task", "layer", "train", "val", "val score", "params",
                                "seconds", "version", "promoted", "skipped"], rows))


@app.command("eval")
def eval_(
    tree: Optional[list[str]] = typer.Option(None, "--tree"),
    lake: Optional[Path] = typer.Option(None, "--lake", help="Lake whose _ground_truth.parquet to use (default: HOME/lake)."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip Dense/StatNN and the cross-tree model."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Evaluate the experts against the lake's ground truth, beside Dense and StatNN."""
    from tasks.pipeline import eval_step

    s = settings_for(home)
    doc = run_command(lambda: eval_step(s, tree, str(lake) if lake else None,
                                        baselines=not no_baselines, cross=not no_baselines))
    emit(doc, as_json, render_eval)


def render_eval(doc: dict) -> None:
    cols = ["tree", "task", "layer", "method", "accuracy", "mAP", "top1", "zero-shot top1",
            "zero-shot top5", "params", "train s"]
    rows = []
    for t, r in doc["trees"].items():
        if "skipped" in r:
            rows.append([t, None, None, r["skipped"]] + [None] * 7)
            continue
        name = f"{t} (synthetic)" if r.get("synthetic") else t
        for method in ("probex", "probex_head_only", "dense", "statnn"):
            m = r.get(method)
            if m is None:
                continue
            rows.append([name, r["task"], r["layer"], method, m.get("accuracy"), m.get("map"), m.get("top1"),
                         m.get("zeroshot_top1"), m.get("zeroshot_top5"), m.get("params"), m.get("train_seconds")])
    out.print(table("evaluation (test split; zero-shot on held-out classes)", cols, rows))
    if any(r.get("synthetic") for r in doc["trees"].values()):
        out.print("(synthetic): generated weights at real Hub layouts, to exercise formats; no accuracy is claimed")


@app.command()
def embed(
    tree: Optional[list[str]] = typer.Option(None, "--tree"),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Write every model's position in the weight-language space to the `embeddings` table."""
    from tasks.pipeline import embed_step

    s = settings_for(home)
    doc = run_command(lambda: embed_step(s, tree))
    emit(doc, as_json, lambda d: out.print(table(
        f"embeddings (tag {d['tag']})", ["tree", "expert", "models"],
        [[t, v["version"], v["models"]] for t, v in d["trees"].items()])))


@app.command()
def maintain(
    keep_days: float = typer.Option(14, "--keep-days", min=0, help="Drop table versions older than this."),
    keep_tags: int = typer.Option(14, "--keep-tags", min=0, help="Keep this many newest tags per table."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Compact the catalog's tables, update their indexes, and drop old versions."""
    from tasks.pipeline import maintain_step

    s = settings_for(home)
    doc = run_command(lambda: maintain_step(s, keep_days, keep_tags))
    emit(doc, as_json, lambda d: out.print(table(
        "catalog maintenance", ["table", "version", "versions removed", "MB removed", "tags kept"],
        [[t, r["version"], r["versions_removed"], r["bytes_removed"] / 2**20, r["tags_kept"]]
         for t, r in d["tables"].items()])))


@app.command()
def compact(
    tree: Optional[list[str]] = typer.Option(None, "--tree", help="Only this tree (repeatable); default every tree."),
    max_parts: Optional[int] = typer.Option(None, "--max-parts", min=1,
                                            help="Open parts per layer before they merge into one (default 8)."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Fold the shards' small per-model files into large Parquet parts, layer by layer."""
    from tasks.compact import compact_step

    s = settings_for(home)
    doc = run_command(lambda: compact_step(s, tree, max_parts))
    emit(doc, as_json, lambda d: out.print(table(
        f"shard compaction ({d['files_before']} files -> {d['files_after']})",
        ["tree", "layer", "small files", "folded", "parts before", "parts after", "MB written", "seconds"],
        [[r["tree"], r["layer"], r["small_files"], r["folded"], r["parts_before"], r["parts_after"],
          r["bytes_written"] / 2**20, r["seconds"]] for r in d["layers"]])))


# -- queries ------------------------------------------------------------------------------------
def open_query(home: Optional[Path]):
    from storage.query import CatalogQuery

    s = settings_for(home)
    return CatalogQuery(s.catalog, str(s.experts), s.text_encoder)


def frame_doc(df) -> dict:
    return {"results": json.loads(df.to_json(orient="records"))}


def render_frame(title: str, cols: list[str]):
    def render(doc: dict) -> None:
        out.print(table(title, cols, [[r.get(c) for c in cols] for r in doc["results"]]))
    return render


@app.command()
def search(
    text: str = typer.Argument(..., help='What the models were trained on, e.g. "birds".'),
    k: int = typer.Option(10, "-k", "--k", min=1),
    tree: Optional[str] = typer.Option(None, "--tree"),
    where: Optional[str] = typer.Option(None, "--where", help="A LanceDB SQL filter on the embeddings table."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Find models by what they were trained on, from their weights alone."""
    df = run_command(lambda: open_query(home).search(text, k=k, tree=tree, where=where))
    emit(frame_doc(df), as_json, render_frame(f"models for {text!r}", ["repo_id", "tree_id", "score", "top_labels", "labels"]))


@app.command()
def classify(
    repo_id: str = typer.Argument(...),
    labels: str = typer.Option(..., "--labels", help='Comma-separated candidates, e.g. "dog,cat,bird".'),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Zero-shot: how well does each free-text label describe what this model was trained on?"""
    df = run_command(lambda: open_query(home).classify(repo_id, split_list(labels) or []))
    emit(frame_doc(df), as_json, render_frame(f"{repo_id}", ["label", "score", "matched_class", "tree_id"]))


@app.command()
def similar(
    repo_id: str = typer.Argument(...),
    k: int = typer.Option(10, "-k", "--k", min=1),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Models of the same tree whose weights say they were trained on similar things."""
    df = run_command(lambda: open_query(home).similar(repo_id, k=k))
    emit(frame_doc(df), as_json, render_frame(f"like {repo_id}", ["repo_id", "score", "top_labels", "labels"]))


# -- flows ----------------------------------------------------------------------------------------
def run_flow(load_flow: Callable[[], Callable], **params):
    """Run a Prefect flow against PREFECT_API_URL, or a local API started for this command.
    `load_flow` imports the flow (seconds of imports) while the local API starts."""
    from flows.runtime import prefect_api

    def go():
        with prefect_api(load_flow) as flow_fn:
            return flow_fn(**params)
    return run_command(go)


def ingest_flow():
    from flows.ingest import ingest
    return ingest


def demo_flow():
    from flows.demo import demo
    return demo


@app.command()
def ingest(
    source: Optional[str] = typer.Option(None, "--source", help="A lake folder, `hub`, or `hub:<endpoint>` (default: HOME/lake)."),
    since: Optional[str] = typer.Option(None, "--since", help="Backfill from (default: the watermark)."),
    until: Optional[str] = typer.Option(None, "--until", help="Backfill until (exclusive)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """The nightly job as a Prefect flow: crawl, extract the layers trees need (Dask), embed."""
    s = settings_for(home)
    doc = run_flow(ingest_flow, source=source, since=parse_date(since, "--since"),
                   until=parse_date(until, "--until"), limit=limit, home=str(s.home))
    emit(doc, as_json, lambda d: (render_crawl(d["crawl"]), render_extract(d["extract"])))


@app.command()
def demo(
    size: str = typer.Option("small", "--size", help="Lake size to build if absent."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Build the demo lake if absent, ingest it, train the experts, evaluate, and search."""
    s = settings_for(home)
    doc = run_flow(demo_flow, size=size, home=str(s.home))
    emit(doc, as_json, render_demo)


def render_demo(doc: dict) -> None:
    if doc.get("lake"):
        render_lake_summary(doc["lake"])
    render_crawl(doc["ingest"]["crawl"])
    render_extract(doc["ingest"]["extract"])
    render_train(doc["train"])
    render_eval(doc["eval"])
    rows = []
    for sr in doc["searches"]:
        hits = sr.get("hits") or []
        top = ", ".join(f"{h['repo_id'].split('/')[-1]} ({'/'.join(h['truth'] or ['?'])})" for h in hits[:3])
        rows.append([sr["query"], sr["why"], sr["tree"].split("/")[-1], "yes" if sr.get("hit@5") else "no",
                     sr.get("error") or top])
    out.print(table("example searches (truth from the lake's ground truth)",
                    ["query", "kind", "tree", "hit@5", "top 3 (trained on)"], rows))
    out.print(table("stage timings", ["stage", "seconds"], [[k, v] for k, v in doc["stages"].items()]))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
