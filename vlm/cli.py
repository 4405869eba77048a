"""``vlm``: the one command-line entry point, ``vlm <command> [options]``.

Each command lives in its own module, imported only when that command runs, so that
``vlm --help`` (and ``vlm train --help``, ``vlm chat --help``) answer without importing
torch. Options are spelled with underscores, as the config fields are (``--max_new_tokens``,
``--optim.warmup_steps``); the dispatcher rewrites ``--a-b`` and ``--a-b=v`` to ``--a_b`` and
``--a_b=v`` (the name only, never a value), so dashes work too. ``vlm demo`` passes its
arguments to ``streamlit run`` unchanged.
"""

from __future__ import annotations

import difflib
import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROG = "vlm"


@dataclass(frozen=True)
class Command:
    target: str
    """``module:function``; the function takes the command's arguments and returns an exit code."""
    summary: str
    """One line for ``vlm --help``."""
    extra: str | None = None
    """The extras (``pip install 'vlm[...]'``) the command needs beyond the library."""
    rewrite: bool = True
    """Rewrite dashes in option names to underscores (not for a pass-through to another program)."""


COMMANDS = {
    "chat": Command("vlm.chat_cli:main", "ask questions about an image in the terminal (the bundled model)"),
    "caption": Command(
        "vlm.apps.caption:main", "caption many images (folders, lists, shards) into JSONL/CSV; resumable"
    ),
    "sketch2html": Command("vlm.apps.sketch2html:main", "turn hand-drawn page sketches into HTML pages"),
    "eval": Command("vlm_train.eval.cli:main", "score a model on held-out shards, zero- and few-shot", "train,eval"),
    # vlm_train.config:main, not vlm_train.train:main (which imports torch): help and --print_config stay light.
    "train": Command("vlm_train.config:main", "train a model from a preset or recipe; any config field", "train"),
    "data": Command(
        "vlm_train.data.cli:main", "write webdataset shards from your files, bundled data or generators", "train"
    ),
    "convert": Command("vlm.convert:main", "turn an OpenFlamingo or IDEFICS checkpoint into a vlm checkpoint folder"),
    "serve": Command("vlm_serve.app:main", "an OpenAI-compatible HTTP server (continuous batching)", "serve"),
    "demo": Command("vlm.cli:demo", "start the Streamlit demo (chat, captions, sketch to HTML)", "demo", rewrite=False),
}

# Top-level modules of the extras' packages: a command that fails to import one of them
# says which extra to install instead of showing a traceback.
EXTRA_MODULES = {
    "webdataset": "train",
    "easy_vqa": "train",
    "tensorboard": "train",
    "jsonargparse": "train",
    "docstring_parser": "train",
    "pycocoevalcap": "eval",
    "zss": "eval",
    "playwright": "render",
    "streamlit": "demo",
    "uvicorn": "serve",
    "starlette": "serve",
}


def underscore_options(argv: Sequence[str]) -> list[str]:
    """``--max-new-tokens 8`` → ``--max_new_tokens 8``, ``--a-b=x-y`` → ``--a_b=x-y``: option
    names only; values, short options and everything after a bare ``--`` are left as they are."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            out[i] = "--" + name.replace("-", "_") + eq + value
    return out


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [options]     ({PROG} <command> --help: the command's options)",
        "",
        "A Flamingo-style vision-language model: ask about images, caption them, turn sketches",
        "into HTML pages; train and evaluate models.",
        "",
        "commands:",
    ]
    for name, command in COMMANDS.items():
        needs = f"  [pip install 'vlm[{command.extra}]']" if command.extra else ""
        lines.append(f"  {name:<{width}}  {command.summary}{needs}")
    lines += [
        "",
        "options:",
        "  -h, --help  show this help and exit",
        "  --version   show the version and exit",
        "",
        "Options are spelled with underscores (--max_new_tokens, --optim.lr); dashes work too.",
    ]
    return "\n".join(lines) + "\n"


def _missing_extra(error: ImportError, command: Command) -> str | None:
    top = (error.name or "").split(".")[0]
    if top not in EXTRA_MODULES:
        return None
    extra = command.extra or EXTRA_MODULES[top]
    return f"{top} is not installed: pip install 'vlm[{extra}]'"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm <command> ...`` and return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(help_text(), end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{PROG}: error: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if command.rewrite:
        rest = underscore_options(rest)
    module, _, function = command.target.partition(":")
    try:
        run = getattr(importlib.import_module(module), function)
        return _exit_code(run, rest)
    except ImportError as e:
        message = _missing_extra(e, command)
        if message is None:
            raise
        print(f"{PROG} {name}: error: {message}", file=sys.stderr)
        return 1


def _exit_code(run, args: list[str]) -> int:
    """The command's return value, or the code of the SystemExit it raised (argparse's
    ``--help`` and errors), as an int."""
    try:
        code = run(args)
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            return 1
    return 0 if code is None else code


# ---------------------------------------------------------------------- vlm demo

DEMO_HELP = """\
usage: vlm demo [STREAMLIT_OPTION ...] [-- --model DIR ...]

Start the Streamlit demo (demo/app.py of a source checkout) on the bundled model, headless:
open the URL it prints. Options go to `streamlit run` (e.g. --server.port 8502); the demo's
own come after `--`. Visitors choose only among the models the operator allows:
  VLM_DEMO_MODEL=runs/x/model vlm demo                # instead of the bundled model
  vlm demo -- --model runs/a/model --model runs/b/model
  VLM_DEMO_MODELS=runs/a/model:runs/b/model vlm demo  # the same, os.pathsep separated
Ratings and corrections go to ./feedback (vlm demo -- --feedback DIR, or VLM_DEMO_FEEDBACK;
"off" keeps none); `vlm data feedback DIR --out shards/feedback` makes training data of them.
  vlm demo -- --device cuda --dtype bfloat16          # default auto: CUDA and bf16 when present
Needs the 'demo' extra: pip install 'vlm[demo]'.
"""


def demo_app() -> Path:
    """demo/app.py beside the vlm package: the demo runs from a source checkout."""
    return Path(__file__).resolve().parent.parent / "demo" / "app.py"


def demo(argv: Sequence[str]) -> int:
    """``vlm demo``: ``streamlit run demo/app.py`` with the given arguments."""
    args = list(argv)
    if args[:1] in (["-h"], ["--help"]):
        print(DEMO_HELP, end="")
        return 0
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        print(f"{PROG} demo: error: streamlit is not installed: pip install 'vlm[demo]'", file=sys.stderr)
        return 1
    app = demo_app()
    if not app.is_file():
        print(f"{PROG} demo: error: {app} not found: the demo runs from a source checkout of vlm", file=sys.stderr)
        return 1
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}  # never a model hub at run time
    command = [sys.executable, "-m", "streamlit", "run", str(app)]
    command += ["--server.headless", "true", "--browser.gatherUsageStats", "false", *args]
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
