"""Every byte in or out: model sources, the single-tensor reader, Parquet shards, the LanceDB
catalog, expert checkpoints and run state."""
