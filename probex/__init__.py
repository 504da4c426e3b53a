"""ProbeX Catalog: a search engine over model weights.

`probex_core.settings` is the one place for settings and environment variables; `probex.cli` is the
`probex` command. The science lives in `probex_core`, bytes in `storage`, orchestration in
`tasks` and `flows`, and the bundled demo lake builder in `zoo`.
"""

__version__ = "0.1.0"
