"""Feature extraction: encoder actor pools on Ray Data -> WebDataset shards + Parquet index."""
