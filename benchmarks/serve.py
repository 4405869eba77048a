"""Serving throughput: N concurrent clients against the OpenAI-compatible server.

    python benchmarks/serve.py                          # the bundled model, 8 clients
    python benchmarks/serve.py --clients 4 --max_tokens 16 --requests_per_client 1
    python benchmarks/serve.py --tiny                   # tiny random model: checks the script in seconds

The same requests (a question about a drawn image, as a data: URI, each asking for its
own number of tokens between half of ``--max_tokens`` and all of it) are served three
ways by real ``vlm serve`` processes on localhost, each on a freshly started server:

- ``one at a time``: one client sends them one after another;
- ``static batch``: ``--clients`` clients at once against ``--batching static``, where a
  batch runs until its last request ends before the next batch starts;
- ``continuous``: the same clients against continuous batching (requests join and leave
  the running batch between decode steps).

Each client sends ``--requests_per_client`` requests in turn and stops early after
``--duration`` seconds. Tokens are decoded whatever the model says (``ignore_eos``), so
every mode decodes the same number of tokens. Reported: total completion tokens per
second of wall time, time to first token (first streamed text) and request latency,
p50 and p95, and each mode's tokens/s over one-at-a-time's. Run it on an idle machine:
other load on the CPU changes every figure.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
from generate import QUESTIONS  # noqa: E402 (benchmarks/ is on the path of its scripts)


def example_image_uri() -> str:
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 70, 104, 150), fill=(220, 30, 30))
    draw.rectangle((128, 70, 200, 142), fill=(30, 60, 220))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Result:
    tokens: int
    ttft: float
    latency: float


def tiny_checkpoint(folder: Path) -> Path:
    import vlm
    from vlm.tiny import make_tiny_lm, tiny_config

    make_tiny_lm(folder / "lm", "llama", chat=True)
    model, _ = vlm.create_model_and_transforms(tiny_config(folder / "lm"), verbose=False)
    return vlm.save_pretrained(model, folder / "ckpt")


class Server:
    """A ``vlm serve`` process on a free localhost port."""

    def __init__(self, model: str | None, batching: str, clients: int, threads: int | None):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        command = [sys.executable, "-m", "vlm_serve", "--port", str(self.port), "--served_model_name", "bench"]
        command += ["--batching", batching, "--max_concurrent", str(clients), "--log_level", "warning"]
        command += ["--max_queued", str(4 * clients)]
        if model:
            command += ["--model", model]
        if threads:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(command, cwd=ROOT)
        import openai

        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0, timeout=3600
        )
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}")
            try:
                self.client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        self.load_s = time.monotonic() - started

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def one_request(client, image: str, question: str, max_tokens: int) -> Result:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model="bench",
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}],
            }
        ],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Result(tokens, (first or end) - start, end - start)


def workload(clients: int, per_client: int, max_tokens: int) -> list[list[tuple[str, int]]]:
    """Per client, its (question, max_tokens) requests; lengths spread over [max/2, max]."""
    plan = []
    for c in range(clients):
        requests = []
        for r in range(per_client):
            i = c * per_client + r
            share = ((i * 5) % 8) / 7  # 0 … 1, mixed across clients
            requests.append((QUESTIONS[i % len(QUESTIONS)], max(1, round(max_tokens * (0.5 + 0.5 * share)))))
        plan.append(requests)
    return plan


def run(server: Server, plan, concurrent: bool, duration: float, image: str) -> tuple[list[Result], float]:
    results: list[Result] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(requests):
        for question, max_tokens in requests:
            if time.perf_counter() > stop_at:
                return
            result = one_request(server.client, image, question, max_tokens)
            with lock:
                results.append(result)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=client, args=(requests,)) for requests in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        client([request for requests in plan for request in requests])
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (checks the script)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600.0, help="clients start no request after it (s)")
    parser.add_argument("--threads", type=int, help="the server's torch threads")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests_per_client, args.max_tokens) < 1:
        parser.error("--clients, --requests_per_client and --max_tokens must be >= 1")
    model = args.model
    if args.tiny:
        model = str(tiny_checkpoint(Path(tempfile.mkdtemp())))
    image = example_image_uri()
    plan = workload(args.clients, args.requests_per_client, args.max_tokens)
    print(
        f"{args.clients} clients x {args.requests_per_client} requests, max_tokens {args.max_tokens // 2 or 1}-"
        f"{args.max_tokens}, model {model or 'bundled'}, {os.cpu_count()} CPUs, load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        flush=True,
    )
    rows = []
    for label, batching, concurrent in [
        ("one at a time", "continuous", False),
        ("static batch", "static", True),
        ("continuous", "continuous", True),
    ]:
        server = Server(model, batching, args.clients, args.threads)
        try:
            one_request(server.client, image, QUESTIONS[0], 2)  # warm-up
            results, wall = run(server, plan, concurrent, args.duration, image)
        finally:
            server.close()
        tokens = sum(r.tokens for r in results)
        ttft = [r.ttft for r in results]
        latency = [r.latency for r in results]
        rows.append((label, len(results), tokens, wall, tokens / wall, ttft, latency))
        print(f"  {label}: {len(results)} requests, {tokens} tokens in {wall:.1f} s", flush=True)
    base = rows[0][4]
    header = f"{'mode':<14} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'x one':>6}"
    header += f" {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8}"
    print("\n" + header)
    for label, n, tokens, wall, rate, ttft, latency in rows:
        print(
            f"{label:<14} {n:>8} {tokens:>7} {wall:>7.1f} {rate:>9.2f} {rate / base:>6.2f}"
            f" {percentile(ttft, 50):>9.2f} {percentile(ttft, 95):>9.2f}"
            f" {percentile(latency, 50):>8.2f} {percentile(latency, 95):>8.2f}"
        )
    print("(seconds; x one: tokens/s over one at a time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
