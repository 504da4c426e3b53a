"""Prefect flows: ingest, backfill, train experts, build the demo lake, demo."""
