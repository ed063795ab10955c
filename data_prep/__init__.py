"""Dataset preparation on Ray: raw datasets to Parquet shards with a manifest."""
