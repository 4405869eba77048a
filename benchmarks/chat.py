"""Conversations at once in one process, as the demo's visitors: each on its own thread, or through one engine.

    python benchmarks/chat.py                       # the bundled model: 1 and 2 users, 2 repetitions
    python benchmarks/chat.py --users 1 2 4 --tokens 32
    python benchmarks/chat.py --tiny                # tiny random model: checks the script in seconds

Each user holds a :class:`vlm.chat.Chat` about an image of their own and asks
``--questions`` questions in turn, each answered with exactly ``--tokens`` tokens (stop
tokens ignored), the way Streamlit runs each visitor's script on a thread of its own.
``thread``: the chats decode on their users' threads (the demo before it used the engine);
``engine``: the chats send their turns to one :class:`vlm.engine.Engine`. Modes and user
counts alternate within each repetition, so a drift in the machine's speed does not land
on one of them. Printed: wall time per repetition, total tokens/s (median), time to first
token (median over all turns), and the engine's speed-up. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from generate import build  # benchmarks/generate.py: benchmarks/ is on the path of its scripts
from PIL import Image, ImageDraw

QUESTIONS = ["What shape is in the picture?", "What colour is it?", "Is it big?", "Where is it?"]
COLOURS = ["red", "blue", "green", "orange", "purple", "cyan", "magenta", "yellow"]


def picture(colour: str) -> Image.Image:
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((24, 70, 104, 150), fill=colour)
    return image


def load(tiny: bool):
    """The bundled model as the apps load it, or generate.py's tiny random one."""
    import vlm

    return build(True) if tiny else vlm.load_model(verbose=False, lm_weights="auto")


def converse(model, processor, engine, colour: str, questions: int, tokens: int) -> list[float]:
    """One user's conversation; the time to first token of each turn."""
    from vlm.chat import Chat
    from vlm.generate import GenerationConfig

    chat = Chat(model, processor, [picture(colour)], engine=engine)
    config = GenerationConfig(max_new_tokens=tokens, stop_token_ids=())
    firsts = []
    for question in (QUESTIONS * questions)[:questions]:
        start, first = time.perf_counter(), None
        for _ in chat.ask_stream(question, config):
            first = first if first is not None else time.perf_counter() - start
        firsts.append(first if first is not None else time.perf_counter() - start)
        chat.turns.clear()  # each question on its own, the demo's default
    return firsts


def run(model, processor, engine, users: int, questions: int, tokens: int) -> tuple[float, list[float]]:
    firsts: list[float] = []
    lock = threading.Lock()

    def user(colour: str) -> None:
        got = converse(model, processor, engine, colour, questions, tokens)
        with lock:
            firsts.extend(got)

    threads = [threading.Thread(target=user, args=(COLOURS[k % len(COLOURS)],)) for k in range(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, firsts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--questions", type=int, default=2, help="turns per user (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per answer (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the bundled one")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vlm.engine import Engine, EngineConfig

    model, processor = load(args.tiny)
    model.eval()
    modes = ("thread", "engine")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.questions} questions x {args.tokens} tokens"
    )
    walls: dict[tuple[int, str], list[float]] = {}
    firsts: dict[tuple[int, str], list[float]] = {}
    with Engine(model, processor.tokenizer, EngineConfig(max_concurrent=max(8, max(args.users)))) as engine:
        run(model, processor, engine, 1, 1, 4)  # warm-up, both ways
        run(model, processor, None, 1, 1, 4)
        for rep in range(args.repeats):
            for users in args.users:
                for mode in modes:
                    wall, got = run(
                        model, processor, engine if mode == "engine" else None, users, args.questions, args.tokens
                    )
                    walls.setdefault((users, mode), []).append(wall)
                    firsts.setdefault((users, mode), []).extend(got)
                    print(f"  repetition {rep + 1}: {users} user(s), {mode}: {wall:.2f} s", flush=True)
    print(
        "\n| users | mode | wall s (each repetition) | tokens/s (median) | first token s (median) | engine faster by |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for users in args.users:
        for mode in modes:
            wall = walls[(users, mode)]
            rate = users * args.questions * args.tokens / statistics.median(wall)
            speedup = ""
            if mode == "engine":
                ratios = [a / b for a, b in zip(walls[(users, "thread")], wall)]
                speedup = f"{statistics.median(ratios):.2f}x"
            shown = ", ".join(f"{w:.2f}" for w in wall)
            first = statistics.median(firsts[(users, mode)])
            print(f"| {users} | {mode} | {shown} | {rate:.1f} | {first:.2f} | {speedup} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
