"""Model sources: one interface (`Source`), two implementations (`LocalSource`, `HubSource`).

Both yield `storage.records.ModelRecord`s newest first and never raise for one bad repo: the
record carries a `status` (see `Status`) and a `reason`.
"""

from storage.sources.base import RateLimited, Source, SourceError
from storage.sources.hub import HubSource, RetryPolicy
from storage.sources.local import LocalSource
from storage.sources.parse import MAX_CARD_BYTES, MAX_CONFIG_BYTES, Status


def open_source(spec: str) -> Source:
    """`hub` (HF_ENDPOINT or huggingface.co), `hub:<endpoint URL>`, or a lake folder path."""
    if spec == "hub":
        return HubSource()
    if spec.startswith("hub:"):
        return HubSource(endpoint=spec[4:])
    return LocalSource(spec)


__all__ = [
    "HubSource",
    "LocalSource",
    "MAX_CARD_BYTES",
    "MAX_CONFIG_BYTES",
    "RateLimited",
    "RetryPolicy",
    "Source",
    "SourceError",
    "Status",
    "open_source",
]
