"""Command-line applications built on the public vlm API: vlm-caption, vlm-sketch2html."""
