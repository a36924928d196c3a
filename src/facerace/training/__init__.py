"""Training: datasets -> cached embeddings (or stored views) -> a model, evaluation, reports and run folders."""
