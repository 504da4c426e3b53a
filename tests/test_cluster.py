"""A cluster of separate processes, started as a user starts one (`dask scheduler`, `dask worker`):
ingest and train survive a worker killed mid-extraction with every model landing exactly once;
trees train as parallel cluster tasks with the sequential results; a training task goes to the
worker that advertises a GPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from probex_core.settings import Settings, apply_runtime_env
from storage.catalog import EMBEDDINGS, MODELS, Catalog
from test_flows import _keys

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")
START_TIMEOUT_S = 120  # a worker imports distributed (and the project) on 2 busy cores


class CliCluster:
    """`dask scheduler` and `dask worker` processes on loopback, each in its own process group
    (a worker's nanny and its worker process die together, as when a machine goes)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.file = root / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}
        # Workers import the project from this checkout; they inherit PREFECT_API_URL when set.
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([DASK, *args], env=self.env, cwd=self.root, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_scheduler(self) -> str:
        # Port 0 and a scheduler file: no port is chosen before it is bound (nothing to race for).
        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(self.file)])
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.file.exists():
            assert self.procs["scheduler"].poll() is None, self.logs()
            assert time.monotonic() < deadline, "the scheduler wrote no scheduler file\n" + self.logs()
            time.sleep(0.1)
        time.sleep(0.1)  # the file is written in one go, but let it be closed
        return self.address

    @property
    def address(self) -> str:
        return json.loads(self.file.read_text())["address"]

    def add_worker(self, name: str, resources: str | None = None) -> None:
        self._spawn(name, ["worker", "--scheduler-file", str(self.file), "--nthreads", "1", "--host", "127.0.0.1",
                           "--no-dashboard", "--name", name, "--local-directory", str(self.root / name),
                           "--death-timeout", "60", *(["--resources", resources] if resources else [])])

    def wait_for_workers(self, n: int) -> dict[str, dict]:
        """name -> the scheduler's info of each worker, once `n` are connected."""
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            try:
                client.wait_for_workers(n, timeout=START_TIMEOUT_S)
            except TimeoutError:
                pytest.fail(f"{n} workers did not connect\n" + self.logs())
            return {w["name"]: {**w, "address": a} for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        os.killpg(self.procs[name].pid, sig)

    def stop(self) -> None:
        """Every process this cluster started, whatever state the test left it in."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
            try:  # a nanny's worker process left behind in the group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def cli_cluster(tmp_path):
    """A factory: start(workers={name: resources or None}) -> the started CliCluster; all stopped
    at the end, even when the test fails."""
    started = []

    def start(workers: dict[str, str | None]) -> CliCluster:
        cluster = CliCluster(tmp_path / f"cluster{len(started)}")
        started.append(cluster)
        cluster.start_scheduler()
        for name, resources in workers.items():
            cluster.add_worker(name, resources)
        cluster.wait_for_workers(len(workers))
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="module")
def extracted(tiny_lake, tmp_path_factory):
    """A home with the tiny lake crawled and every candidate layer extracted: copied by each test."""
    from tasks.pipeline import crawl_step, extract_step

    home = tmp_path_factory.mktemp("extracted")
    shutil.copytree(tiny_lake, home / "lake")
    s = Settings.load(home)
    apply_runtime_env(s)
    crawl_step(s, str(s.lake))
    extract_step(s, mode="candidates")
    return home


def _copy_home(src: Path, dst: Path) -> Path:
    for name in ("lake", "catalog", "shards"):
        shutil.copytree(src / name, dst / name)
    return dst


def _task_stream(client, prefix: str) -> list[dict]:
    """The scheduler's record of each finished task whose key starts with `prefix`: its worker
    and its compute interval."""
    out = []
    for rec in client.get_task_stream():
        key = rec["key"] if isinstance(rec["key"], str) else str(rec["key"])
        compute = [s for s in rec["startstops"] if s["action"] == "compute"]
        if key.startswith(prefix) and compute:
            out.append({"key": key, "worker": rec["worker"], "start": compute[0]["start"], "stop": compute[-1]["stop"]})
    return out


def _expert_info(experts: Path, tree: str) -> dict:
    from storage.experts import load_current

    return load_current(str(experts), tree).config["info"]


def _close(a: dict, b: dict, tol: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


@pytest.mark.slow  # starts a scheduler and workers, trains the tiny lake twice: the full suite runs it
def test_trees_train_as_parallel_cluster_tasks_with_the_sequential_results(extracted, tmp_path, cli_cluster):
    from distributed import Client

    from tasks.pipeline import train_step

    home = _copy_home(extracted, tmp_path / "home")
    sequential = train_step(Settings.load(home, experts=home / "experts-seq"))["trees"]
    cluster = cli_cluster({"w0": None, "w1": None})
    with Client(cluster.address, timeout="30s") as client:
        client.get_task_stream()  # the scheduler records tasks from now on
        parallel = train_step(Settings.load(home, experts=home / "experts-par", dask_address=cluster.address))["trees"]
        stream = _task_stream(client, "train-tree")
    assert sequential.keys() == parallel.keys() and len(parallel) >= 2
    assert len(stream) == len(parallel), stream
    # Each tree its own task, on both workers, two of them running at the same time.
    assert len({r["worker"] for r in stream}) == 2, stream
    assert any(a["start"] < b["stop"] and b["start"] < a["stop"] for i, a in enumerate(stream) for b in stream[i + 1:])
    for tree, seq in sequential.items():
        par = parallel[tree]
        assert par["skipped"] is None and par["version"], par
        assert (par["task"], par["layer"], par["n_train"], par["n_val"]) == (seq["task"], seq["layer"], seq["n_train"], seq["n_val"])
        # Same seeds; only the thread count differs (float summation order): seed noise at most.
        assert _close(par["val"], seq["val"], 0.05), (tree, seq["val"], par["val"])
        info = _expert_info(home / "experts-par", tree)
        assert info["device"] == "cpu" and _expert_info(home / "experts-seq", tree)["device"] == "cpu"


@pytest.mark.slow  # starts a scheduler and workers, trains the tiny lake: the full suite runs it
def test_training_goes_to_the_worker_that_advertises_a_gpu(extracted, tmp_path, cli_cluster):
    """`--resources GPU=1` is only a scheduling label: the task lands there, the worker finds no
    CUDA and trains on the CPU, and the expert says so."""
    from distributed import Client

    from tasks.dask_cluster import advertised, cluster_gpus
    from tasks.pipeline import train_step

    home = _copy_home(extracted, tmp_path / "home")
    cluster = cli_cluster({"cpu-worker": None, "gpu-worker": "GPU=1"})
    gpu_address = cluster.wait_for_workers(2)["gpu-worker"]["address"]
    assert cluster_gpus(cluster.address) == 1
    with Client(cluster.address, timeout="30s") as client:
        assert advertised(client) == 1
        client.get_task_stream()
        trained = train_step(Settings.load(home, dask_address=cluster.address))["trees"]
        stream = _task_stream(client, "train-tree")
    assert len(stream) == len(trained) >= 2
    assert {r["worker"] for r in stream} == {gpu_address}, stream
    for tree, r in trained.items():
        assert r["version"], r
        info = _expert_info(home / "experts", tree)
        assert info["device"] == "cpu" and info["host"]


@pytest.fixture(scope="module")
def api():
    from flows.runtime import prefect_api

    apply_runtime_env(Settings.load())
    with prefect_api() as url:
        yield url


@pytest.mark.slow  # starts a Prefect server, a scheduler and workers, ingests and trains: the full suite runs it
def test_ingest_and_train_on_a_process_cluster_survive_a_killed_worker(tiny_lake, tmp_path, api, cli_cluster,
                                                                       monkeypatch):
    """SIGKILL one of two workers (nanny and worker process) in the middle of the ingest's
    extraction: Dask runs its tasks again on the other; every model lands exactly once in the
    catalog, the shards and the embeddings, and training on what is left of the cluster works."""
    from flows.ingest import ingest
    from flows.train import train_experts
    from storage.shards import layers_of, read_layer
    from tasks.extract import needs_root

    home = tmp_path / "home"
    shutil.copytree(tiny_lake, home / "lake")
    cluster = cli_cluster({"w0": None, "w1": None})  # after `api`: the workers report to its server
    monkeypatch.setenv("PROBEX_DASK_ADDRESS", cluster.address)
    shards = home / "shards"
    seen: dict = {}

    def kill_mid_extraction():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen.get("stop"):
            if shards.exists() and any(shards.rglob("*.parquet")):
                # Freeze both workers, count what has landed, then kill one: the kill is in the
                # middle of extraction by construction, whatever the machine's speed.
                for name in ("w0", "w1"):
                    cluster.kill(name, signal.SIGSTOP)
                seen["landed"] = len(list(shards.rglob("*.parquet")))
                cluster.kill("w0")
                cluster.kill("w1", signal.SIGCONT)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_mid_extraction, daemon=True)
    killer.start()
    try:
        doc = ingest(home=str(home))
    finally:
        seen["stop"] = True
        killer.join(timeout=30)
    assert "landed" in seen, "no shard appeared: the worker was never killed\n" + cluster.logs()
    extract = doc["extract"]
    assert 0 < seen["landed"] < extract["extracted"], (seen, extract)
    assert not any("worker_failed" in q["reason"] for q in extract["quarantined"]), extract["quarantined"]

    trained = train_experts(home=str(home))
    assert trained["gpus"] == 0
    cat = Catalog(str(home / "catalog"))
    models = _keys(cat, MODELS)
    children = {(r["repo_id"], r["sha"]): r["tree_id"] for r in models
                if r["status"] == "ok" and r["tree_id"] and r["repo_id"] != r["tree_id"]}
    # a tree whose children mix full fine-tunes and adapters has its root's layer read too (deltas)
    members: dict[str, list[dict]] = {}
    for r in models:
        if (r["repo_id"], r["sha"]) in children:
            members.setdefault(r["tree_id"], []).append(r)
    roots = {(r["repo_id"], r["sha"]): r["repo_id"] for r in models if needs_root(members.get(r["repo_id"], []))}
    assert roots and len(children) + len(roots) == extract["extracted"] + extract["skipped"] > 0, (
        len(children), sorted(roots.values()), {k: extract[k] for k in ("models", "extracted", "skipped")})
    for tree in set(children.values()):
        want = sorted(k for k, t in (children | roots).items() if t == tree)
        for layer in layers_of(shards, tree):
            rows = sorted((r.repo_id, r.sha) for r in read_layer(shards, tree, layer))
            assert rows == want, (tree, layer)  # each model exactly once: no duplicate, no loss
    # the killed worker's cut-short write left at most a temporary name, never read; compaction clears it
    import storage.compaction as compaction

    monkeypatch.setattr(compaction, "STALE_TMP_S", 0)
    compaction.compact_all(shards)
    assert not list(shards.rglob("*.tmp"))
    for tree, r in trained["train"]["trees"].items():
        assert r["skipped"] is None and r["version"], r
    embedded = _keys(cat, EMBEDDINGS)
    current = {t["tree_id"]: t["expert_version"] for t in cat.read("trees").to_pylist()}
    for_current = sorted((e["repo_id"], e["sha"]) for e in embedded if e["expert_version"] == current.get(e["tree_id"]))
    assert for_current == sorted(children), "every model embedded once by its tree's current expert"


@pytest.mark.slow  # starts a Prefect server and a LocalCluster, trains the tiny lake: the full suite runs it
def test_the_train_flow_trains_and_embeds_on_its_dask_runner(extracted, tmp_path, api, monkeypatch):
    """No cluster configured: the flow's runner starts a LocalCluster, and training and embedding
    run there as tasks, one per tree, each expert recording where it trained."""
    from flows.train import train_experts

    monkeypatch.delenv("PROBEX_DASK_ADDRESS", raising=False)
    home = _copy_home(extracted, tmp_path / "home")
    doc = train_experts(home=str(home))
    trees = doc["train"]["trees"]
    assert len(trees) >= 2 and doc["gpus"] == 0
    assert all(r["promoted"] and r["version"] for r in trees.values()), trees
    assert set(doc["embed"]["trees"]) == set(trees)
    assert all(_expert_info(home / "experts", t)["device"] == "cpu" for t in trees)
    _keys(Catalog(str(home / "catalog")), EMBEDDINGS)
