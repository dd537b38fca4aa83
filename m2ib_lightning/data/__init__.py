"""Data sources and streams of runs: the shapes world's held-out pairs and questions, manifests (JSONL, CSV,
folders), WebDataset shards, and the datasets that turn records into model inputs through the adapter."""
