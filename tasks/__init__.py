"""Prefect tasks: thin wrappers joining probex_core and storage; logic callable via `task.fn`."""
