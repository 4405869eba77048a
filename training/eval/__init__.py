"""Evaluation: metrics and the vlm-eval command."""
