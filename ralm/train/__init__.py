"""Adapter training: WebDataset shards -> bucketed batches -> DeepSpeed engines inside Ray Train workers."""
