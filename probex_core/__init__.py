"""The science, pure: no Prefect, no Dask, no LanceDB, no network."""
