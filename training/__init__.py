"""Training stack: data pipelines, the trainer and distributed setup (coming in later issues)."""
