"""Data: shard formats, builders, synthetic generators and the streaming loader."""
