"""Model sources: one interface (`Source`), one module per kind (`local`, `hub`, ...).

Every source yields `storage.records.ModelRecord`s newest first and never raises for one bad repo:
the record carries a `status` (see `Status`) and a `reason`. A source is named by a spec
("local:/abs/lake", "hub:https://huggingface.co") that `open_source` turns back into it.

Adding a kind of source is adding one module here: a `Source` subclass with a `scheme`, which
registers itself when defined; every module of this package is imported below.
"""

import importlib
import pkgutil

from storage.sources.base import RateLimited, RepoOpener, Source, SourceError, open_source, registered
from storage.sources.hub import HubOpener, HubSource, RetryPolicy
from storage.sources.local import LocalOpener, LocalSource
from storage.sources.parse import MAX_CARD_BYTES, MAX_CONFIG_BYTES, Status


def load_modules() -> None:
    """Import every module of this package (and of any folder added to its `__path__`), so each
    Source subclass they define is registered."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


load_modules()

__all__ = [
    "HubOpener",
    "HubSource",
    "LocalOpener",
    "LocalSource",
    "MAX_CARD_BYTES",
    "MAX_CONFIG_BYTES",
    "RateLimited",
    "RepoOpener",
    "RetryPolicy",
    "Source",
    "SourceError",
    "Status",
    "load_modules",
    "open_source",
    "registered",
]
