"""The command-line applications, ``vlm caption`` and ``vlm sketch2html``: argument parsing
and I/O only; the work is done by the library (:mod:`vlm.tasks`, :mod:`vlm.render`).

Flags are spelled with underscores (``--max_new_tokens``); the ``vlm`` command turns
``--max-new-tokens`` into that before a ``main`` sees it. Importing an app and building its
parser does not import torch, so ``--help`` answers at once; ``main`` imports the rest.
"""

from __future__ import annotations

import argparse
import re

DTYPES = ("auto", "float32", "bfloat16", "float16")  # vlm.factory.DTYPES (which imports torch)
LM_WEIGHTS = ("auto", "float32", "float32-packed", "float16", "bfloat16", "int8")  # vlm.quantize.LM_WEIGHTS and auto
LM_WEIGHTS_HELP = (
    "how the frozen weights are held for inference (default: auto: float16 weights with float32 arithmetic "
    "for the LM and the cross-attention blocks on x86 CPUs, the image side in oneDNN's float32 layout, else as "
    "loaded; float32 turns that off; float32-packed: float32 everywhere, every layer in oneDNN's layout)"
)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def add_model_arguments(parser: argparse.ArgumentParser, lm_weights_help: str = LM_WEIGHTS_HELP) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--lm_weights``, which every inference
    command takes and passes to :func:`vlm.factory.load_model`; ``lm_weights_help``: the
    help of ``--lm_weights`` for a command whose default (set with ``set_defaults``) is not ``auto``."""
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint folder or Hub repo id owner/name (default: the bundled model)"
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        metavar="DEVICE",
        help="auto, cpu, cuda, cuda:N or mps (default: auto: cuda when available, else mps, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="cast the weights to this dtype (default: auto: bfloat16 on CUDA, else as stored)",
    )
    parser.add_argument(
        "--lm_weights",
        choices=LM_WEIGHTS,
        default="auto",
        help=lm_weights_help,
    )
