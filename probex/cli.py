"""The `probex` command. Sub-commands are thin: parse, call a flow/task/query, print.

Conventions (ARCHITECTURE.md): every sub-command takes `--home`; human output is a rich table on
stdout; `--json` prints exactly one JSON document on stdout with progress and logs on stderr; a
user mistake exits non-zero with one line that says what to do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from probex.config import Settings, apply_runtime_env
from probex_core.errors import ProbexError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
zoo_app = typer.Typer(no_args_is_help=True, help="Build the bundled demo model lake.")
app.add_typer(zoo_app, name="zoo")

out = Console()  # stdout: tables, or the one JSON document
err = Console(stderr=True)  # progress, logs, errors

HomeOpt = typer.Option(None, "--home", help="Home folder (default: $PROBEX_HOME or ./.probex).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def settings_for(home: Optional[Path], **overrides) -> Settings:
    s = Settings.load(home, **overrides)
    apply_runtime_env(s)
    return s


def run_command(fn: Callable[[], object]) -> object:
    """Run a command body; a ProbexError becomes one line on stderr and exit code 1."""
    try:
        return fn()
    except ProbexError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)


def emit(doc: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        render(doc)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


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


# -- demo ---------------------------------------------------------------------------------------
@app.command()
def demo(
    size: str = typer.Option("small", "--size", help="Lake size to build if absent."),
    home: Optional[Path] = HomeOpt,
    as_json: bool = JsonOpt,
):
    """Build the demo lake if absent, then run the pipeline on it and show what it found."""
    from zoo.build import build_lake

    s = settings_for(home)
    summary = run_command(lambda: build_lake(s.lake, size=size, seed=0, progress=True))
    emit(summary.to_dict(), as_json, render_lake_summary)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
