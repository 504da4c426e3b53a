"""docs/hub_projection.md: a nightly of the real Hub and a backfill of it, projected from the
per-model costs the scale benchmark measured on the simulated Hub.

    .venv/bin/python scripts/bench_scale.py costs      # measures: $PROBEX_BENCH_DIR/hub_costs.json
    .venv/bin/python scripts/hub_projection.py [COSTS_JSON]   # writes docs/hub_projection.md
    (COSTS_JSON default: $PROBEX_BENCH_DIR/hub_costs.json; the kept one: docs/bench/hub_costs.json)

Measured: requests per model by Hub bucket and by stage, bytes read per model, worker seconds per
model. Assumed (each named on the page with where it comes from): the Hub's volumes and budgets,
the share of models that have safetensors or declare no lineage, layer and header sizes, and the
network. Nothing here reaches the network.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "hub_projection.md"
COSTS = Path(os.environ.get("PROBEX_BENCH_DIR", "/tmp/probex-bench")) / "hub_costs.json"

NIGHTLY, BACKFILL = 3_000, 2_000_000  # models: new a day (the issue), and the Hub today
WINDOW_S = 300  # the Hub counts per 5-minute window
BUDGETS = {  # per window, (api, resolvers); docs ARCHITECTURE.md "The Hub as it is" (2025)
    "anonymous": (500, 3_000), "free token": (1_000, 5_000), "PRO": (2_500, 12_000)}
SAFETENSORS = 0.6  # share of new models with safetensors weights (the rest: pickles, GGUF; never read)
NO_LINEAGE = 0.5  # share declaring no base_model (Model Atlas 2025: "more than half"): routed by weights
LAYERS = {"ViT-B layer": 2.25 * 2**20, "Llama-3-8B q_proj": 32 * 2**20, "SD LoRA cross-attention": 160 * 2**10}
HEADER = 64 * 2**10  # bytes of safetensors header (+ index) read per model on a real checkpoint
LATENCY_S = 0.1  # per request to the Hub, waited by the worker
BANDWIDTH = 50e6  # bytes per second per worker from the Hub's CDN


@dataclass(frozen=True)
class PerModel:
    """Measured per new model (per extracted model for extract, per embedded for embed)."""

    crawl_api: float
    crawl_resolvers: float
    extract_resolvers: float
    extract_api: float
    bytes_read: float
    crawl_s: float
    extract_s: float
    embed_s: float

    @classmethod
    def of(cls, night: dict) -> PerModel:
        sent, new, done = night["sent_by_stage"], night["new"], night["extracted"]
        return cls(
            crawl_api=(sent["crawl"]["list"] + sent["crawl"]["info"]) / new,
            crawl_resolvers=sent["crawl"]["resolve"] / new,
            extract_api=(sent["extract"]["list"] + sent["extract"]["info"]) / done,
            extract_resolvers=sent["extract"]["resolve"] / done,
            bytes_read=night["bytes_read"] / done,
            crawl_s=night["stages"]["crawl"] / new,
            extract_s=night["extract_worker_s"] / done,
            embed_s=night["stages"]["embed"] / night["embedded"])


@dataclass(frozen=True)
class Run:
    models: int
    api: float
    resolvers: float
    reads: float  # models whose weights are read (extracted, or routed by weights)
    cpu_h: float  # measured worker time, projected

    def bytes(self, layer: float) -> float:
        return self.reads * (layer + HEADER)

    def worker_h(self, layer: float) -> float:
        network = (self.api + self.resolvers) * LATENCY_S + self.bytes(layer) / BANDWIDTH
        return self.cpu_h + network / 3600

    def budget_h(self, budget: tuple[int, int]) -> tuple[float, str]:
        api_h = self.api / budget[0] * WINDOW_S / 3600
        res_h = self.resolvers / budget[1] * WINDOW_S / 3600
        return (api_h, "api") if api_h >= res_h else (res_h, "resolvers")


def project(m: PerModel, models: int, model_info: bool = False) -> Run:
    extracted = models * SAFETENSORS
    routed = extracted * NO_LINEAGE  # a header and the fingerprint tensors: costed as one extraction
    api = models * (m.crawl_api + (1 if model_info else 0)) + (extracted + routed) * m.extract_api
    resolvers = models * m.crawl_resolvers + (extracted + routed) * m.extract_resolvers
    cpu_h = (models * m.crawl_s + (extracted + routed) * m.extract_s + extracted * m.embed_s) / 3600
    return Run(models, api, resolvers, extracted + routed, cpu_h)


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}" if x >= 1 else f"{x:.3f}"


def _gib(x: float) -> str:
    return f"{x / 2**40:,.1f} TiB" if x >= 2**40 else f"{x / 2**30:,.1f} GiB"


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def render(doc: dict) -> str:
    night, mach, listing = doc["nightly"], doc["machine"], doc["listing"]
    m = PerModel.of(night)
    runs = {"nightly": project(m, NIGHTLY), "backfill": project(m, BACKFILL)}
    lines = [
        "# The real Hub, projected",
        "",
        f"_Generated by `scripts/hub_projection.py` from the costs `scripts/bench_scale.py costs` measured "
        f"{mach['date']} on {mach['cores']} cores ({mach['cpu']}, shared with other work), a nightly of "
        f"{night['new']:,} new repos into a {doc['size']:,}-row catalog on the simulated Hub "
        "(`tests/hubserver.py`); the measurement is kept in `docs/bench/hub_costs.json`. Re-measure and "
        "regenerate: `.venv/bin/python scripts/bench_scale.py costs && .venv/bin/python scripts/hub_projection.py` "
        "(about 2 minutes; copy `$PROBEX_BENCH_DIR/hub_costs.json` to `docs/bench/` to keep it); render the kept "
        "one again: `.venv/bin/python scripts/hub_projection.py docs/bench/hub_costs.json`._",
        "",
        "## Measured, per model",
        "",
        "Requests are the simulated Hub's own counts between stages (429s included); the crawl's and "
        "extraction's summaries count the same (`hub` in `probex crawl/ingest --json`).",
        "",
    ]
    lines += _table(["stage", "API calls", "file resolutions", "bytes read", "worker s"], [
        ["crawl (per new model)", _n(m.crawl_api), _n(m.crawl_resolvers), "-", f"{m.crawl_s:.4f}"],
        ["extract one layer (per model)", _n(m.extract_api), _n(m.extract_resolvers),
         f"{m.bytes_read:,.0f} (8x8 F32 layer + header)", f"{m.extract_s:.4f}"],
        ["embed (per model)", "0", "0", "-", f"{m.embed_s:.4f}"],
    ])
    rec = listing["records_workers_8"]
    lines += ["", f"Listing throughput, not rate-limited: {rec['repos_per_s']:,.0f} repos/s as records "
              f"(8 readers; {listing['records_workers_1']['repos_per_s']:,.0f} with one), "
              f"{listing['pages_only']['repos_per_s']:,.0f} repos/s as bare pages (huggingface_hub's "
              f"list_models); reading model info per repo as well (`file_sizes=True`): "
              f"{listing['records_model_info_workers_8']['repos_per_s']:,.0f} repos/s (load average "
              f"{listing['load_avg_1m']:.1f} on {listing['cores']} cores). Over loopback both ends are CPU-bound, so "
              "readers gain nothing there; against a distant Hub they overlap the waits. Worker seconds are "
              "loopback CPU: the projection adds the network below."]
    lines += ["", "## Assumed", ""]
    lines += _table(["figure", "value", "from"], [
        ["new models a day / the Hub's size", f"{NIGHTLY:,} / {BACKFILL:,}", "issue 18"],
        ["budget per 5 min (API, resolvers)", "; ".join(f"{k} {a:,}, {r:,}" for k, (a, r) in BUDGETS.items()),
         "ARCHITECTURE.md (2025)"],
        ["models with safetensors", f"{SAFETENSORS:.0%}", "a guess: many repos ship only pickles or GGUF"],
        ["of those, no declared lineage (routed by weights, costed as one more extraction)", f"{NO_LINEAGE:.0%}",
         "Model Atlas, via ARCHITECTURE.md"],
        ["layer read", ", ".join(f"{k} {_gib(v) if v >= 2**30 else f'{v / 2**20:.2f} MiB'}" for k, v in LAYERS.items()),
         "ARCHITECTURE.md"],
        ["header + index read per model", f"{HEADER / 2**10:.0f} KiB", "a guess for real checkpoints"],
        ["network", f"{LATENCY_S * 1000:.0f} ms a request, {BANDWIDTH / 1e6:.0f} MB/s a worker", "a guess"],
    ])
    lines += ["", "## Requests, bytes, worker-hours", ""]
    rows = []
    for name, r in runs.items():
        for kind, size in LAYERS.items():
            rows.append([name, kind, _n(r.api), _n(r.resolvers), _gib(r.bytes(size)), _n(r.worker_h(size))])
    lines += _table(["run", "layer", "API calls", "file resolutions", "bytes", "worker-hours"], rows)
    n = runs["nightly"]
    lines += ["", "The arithmetic, for the nightly (the backfill scales by "
              f"{BACKFILL / NIGHTLY:,.0f}x): extracted = {NIGHTLY:,} x {SAFETENSORS} = {NIGHTLY * SAFETENSORS:,.0f}, "
              f"routed = {NIGHTLY * SAFETENSORS:,.0f} x {NO_LINEAGE} = {NIGHTLY * SAFETENSORS * NO_LINEAGE:,.0f}; "
              f"API = {NIGHTLY:,} x {_n(m.crawl_api)} = {_n(n.api)}; resolutions = {NIGHTLY:,} x "
              f"{_n(m.crawl_resolvers)} + {n.reads:,.0f} x {_n(m.extract_resolvers)} = {_n(n.resolvers)}; bytes = "
              f"{n.reads:,.0f} x (layer + {HEADER // 2**10} KiB); worker-hours = measured "
              f"({NIGHTLY:,} x {m.crawl_s:.4f} + {n.reads:,.0f} x {m.extract_s:.4f} + "
              f"{NIGHTLY * SAFETENSORS:,.0f} x {m.embed_s:.4f} s = {n.cpu_h:.3f} h) + network "
              f"(requests x {LATENCY_S} s + bytes / {BANDWIDTH / 1e6:.0f} MB/s)."]
    lines += ["", "## Wall time under the Hub's budgets", "",
              "Hours = requests / budget per window x 5 min, for the bucket that binds (the third bucket, "
              "web pages, is never used by us). That is the wall time once enough workers share the budget: "
              "worker-hours (Llama-sized layers, the largest) / hours, rounded up.", ""]
    rows = []
    llama = LAYERS["Llama-3-8B q_proj"]
    for name, r in runs.items():
        info = project(m, r.models, model_info=True)
        for tier, budget in BUDGETS.items():
            hours, bucket = r.budget_h(budget)
            info_h, info_bucket = info.budget_h(budget)
            rows.append([name, tier, f"{hours:,.1f} ({bucket})", str(max(1, math.ceil(r.worker_h(llama) / hours))),
                         f"{info_h:,.1f} ({info_bucket})"])
    lines += _table(["run", "budget", "wall hours", "workers to keep up", "wall hours, model info per repo"], rows)
    free_n, free_b = runs["nightly"].budget_h(BUDGETS["free token"]), runs["backfill"].budget_h(BUDGETS["free token"])
    lines += ["", f"On a free token a nightly is bound by its {free_n[1]} bucket at {free_n[0] * 60:,.0f} minutes, and "
              f"a backfill of {BACKFILL / 1e6:.0f}M models at {free_b[0]:,.0f} hours ({free_b[0] / 24:,.1f} days): file "
              "resolutions (configs, headers, one layer), not API calls, since the listing carries everything "
              "but sizes. Reading model info per repo for file sizes (`HubSource(file_sizes=True)`) adds one API "
              "call per model, which binds first (last column)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else COSTS
    if not path.exists():
        print(f"no {path}: run `.venv/bin/python scripts/bench_scale.py costs` first", file=sys.stderr)
        return 2
    PAGE.write_text(render(json.loads(path.read_text())))
    print(PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
