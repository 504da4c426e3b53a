"""The root of every error that means "the user (or their data) must change something".

The CLI prints such an error as one line and exits non-zero; anything else is a bug and keeps its
stack trace. Each layer subclasses it (ZooError, CatalogError, CorruptFileError, ExpertError, ...).
"""


class ProbexError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
