"""``vlm serve``: an OpenAI-compatible chat-completions server with continuous batching.

Any OpenAI client works unchanged: point its base URL at ``http://HOST:PORT/v1``. Images
come as ``image_url`` parts holding ``data:`` URIs (local files and remote URLs only where
the operator allows them). Ctrl-C (SIGINT) or SIGTERM stops it gracefully: no new
connections, open requests finish for up to ``--shutdown_timeout`` seconds, the rest are
ended, and the engine thread is joined before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlm.apps import LM_WEIGHTS, LM_WEIGHTS_HELP  # no torch: --help answers at once

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # vlm.images.DEFAULT_MAX_PIXELS, without importing it for --help


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(
        prog="vlm serve", description=head.split(": ", 1)[1], epilog=rest, allow_abbrev=False
    )
    add = parser.add_argument
    add("--model", metavar="DIR", help="checkpoint folder (default: the bundled model)")
    add("--served_model_name", metavar="NAME", help="the id clients send as 'model' (default: the folder's name)")
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    add("--port", type=int, default=8000, help="default: %(default)s")
    add("--device", help="cpu, cuda, cuda:1… (default: cuda when available)")
    add(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="cast the model (default: as the checkpoint has it)"
    )
    add(
        "--lm_weights",
        choices=LM_WEIGHTS,
        default="auto",
        help=LM_WEIGHTS_HELP,
    )
    add("--threads", type=int, metavar="N", help="torch's CPU threads (default: torch's choice)")
    add("--max_concurrent", type=int, default=8, metavar="N", help="sequences decoding together (%(default)s)")
    add("--max_queued", type=int, default=64, metavar="N", help="requests waiting beyond those; then 429 (%(default)s)")
    add(
        "--batching",
        choices=["continuous", "static"],
        default="continuous",
        help="static: a batch runs until its last request ends (a baseline for benchmarks/serve.py)",
    )
    add(
        "--max_tokens",
        type=int,
        metavar="N",
        help="for requests that set none (default: the checkpoint's generation_config.json, as vlm chat decodes)",
    )
    add(
        "--temperature",
        type=float,
        help="for requests that set none; 0: greedy (default: the checkpoint's generation_config.json)",
    )
    add("--timeout", type=float, default=600.0, metavar="S", help="per request; 0: none (default: %(default)s)")
    add("--max_request_bytes", type=int, default=20 * 2**20, metavar="N", help="larger: 413 (%(default)s)")
    add("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N", help="larger: 413 (%(default)s)")
    add("--allow_remote_images", action="store_true", help="fetch http(s) image URLs (off: only data: URIs)")
    add(
        "--allowed_local_media_path",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a folder whose files file: URLs may name (repeatable; default: none)",
    )
    add("--shutdown_timeout", type=float, default=30.0, metavar="S", help="on shutdown (default: %(default)s)")
    add("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    numbers = (
        args.max_concurrent,
        1 if args.max_tokens is None else args.max_tokens,
        args.max_request_bytes,
        args.max_image_pixels,
    )
    if min(numbers) < 1 or args.max_queued < 0 or (args.threads is not None and args.threads < 1):
        parser.error(
            "--max_concurrent, --max_tokens, --max_request_bytes, --max_image_pixels and --threads must be >= 1"
        )
    if (
        not 0 <= (args.temperature or 0) <= 2
        or args.timeout < 0
        or args.shutdown_timeout < 0
        or not 0 <= args.port < 65536
    ):
        parser.error("--temperature must be in [0, 2]; --timeout, --shutdown_timeout and --port in range")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a vlm checkpoint folder (no config.json)")
    folders = []
    for folder in args.allowed_local_media_path:
        if not folder.is_dir():
            parser.error(f"--allowed_local_media_path {folder}: not a folder")
        folders.append(folder.resolve())
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=args.log_level.upper())

    import torch  # heavy imports only now, so that --help answers at once
    import uvicorn

    from vlm import load_model
    from vlm.engine import Engine, EngineConfig
    from vlm.quantize import apply_lm_weights

    from .media import MediaPolicy
    from .server import ServerSettings, build_app, generation_defaults

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, processor = load_model(args.model, verbose=False, device=device, dtype=args.dtype)
        model = apply_lm_weights(model, args.lm_weights).eval()
    except Exception as e:  # a broken checkpoint, a missing backbone, no such device: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: cannot load the model on {device}: {e}\n")
    try:
        generation = generation_defaults(model, args.max_tokens, args.temperature)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "vlm-default")
    engine = Engine(
        model,
        processor.tokenizer,
        EngineConfig(
            max_concurrent=args.max_concurrent,
            max_queued=args.max_queued,
            timeout_s=args.timeout or None,
            policy=args.batching,
        ),
    )
    settings = ServerSettings(
        model_name=name,
        media=MediaPolicy(
            max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_request_bytes,
            allow_remote=args.allow_remote_images,
            allowed_local_paths=tuple(folders),
        ),
        max_request_bytes=args.max_request_bytes,
        generation=generation,
        timeout_s=args.timeout or None,
    )
    app = build_app(engine, processor, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # A backstop only: the engine ends what is left at --shutdown_timeout (below), so the
        # streams close themselves and uvicorn never has to cancel a request's task.
        timeout_graceful_shutdown=args.shutdown_timeout + 10,
        lifespan="on",
    )
    server = _server_class(uvicorn, lambda: engine.shutdown(drain_s=args.shutdown_timeout))(config)
    logging.getLogger("vlm_serve").info("serving %s on http://%s:%d/v1 (%s)", name, args.host, args.port, device)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0 if server.started else 1


def _server_class(uvicorn, drain):
    """uvicorn's server, except that on SIGINT/SIGTERM it also calls ``drain`` in a thread
    (the engine lets open requests finish for a while, then ends the rest, whose responses
    then close normally), and after the graceful shutdown it does not raise the signal
    again (which kills the process, or raises KeyboardInterrupt): the engine has stopped
    by then, and the command returns 0."""
    import contextlib
    import signal
    import threading

    from uvicorn.server import HANDLED_SIGNALS

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                threading.Thread(target=drain, name="vlm-serve-drain", daemon=True).start()
            super().handle_exit(sig, frame)

    return Server


if __name__ == "__main__":
    sys.exit(main())
