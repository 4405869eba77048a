"""Serving throughput: N concurrent clients against the OpenAI-compatible server.

    python benchmarks/serve.py                          # the bundled model, 8 clients
    python benchmarks/serve.py --clients 4 --max_tokens 16 --requests_per_client 1
    python benchmarks/serve.py --tiny                   # tiny random model: checks the script in seconds
    python benchmarks/serve.py --max_tokens 128 --reps 3   # three rounds of the modes: medians, paired ratios

The same requests (a question about a drawn image, as a data: URI, each asking for its
own number of tokens between half of ``--max_tokens`` and all of it) are served three
ways by real ``vlm serve`` processes on localhost, each on a freshly started server:

- ``one at a time``: one client sends them one after another;
- ``static batch``: ``--clients`` clients at once against ``--batching static``, where a
  batch runs until its last request ends before the next batch starts;
- ``continuous``: the same clients against continuous batching (requests join and leave
  the running batch between decode steps).

Each client sends ``--requests_per_client`` requests in turn and stops early after
``--duration`` seconds. With ``--text_share F`` that fraction of the requests, spread
over the clients, asks a question without an image. Tokens are decoded whatever the model says (``ignore_eos``), so
every mode decodes the same number of tokens. ``--reps N`` runs the three modes N times, in
an order that rotates, and reports medians and the median of each repetition's ratio (on
a machine whose speed drifts, one round can be off by a tenth either way). Reported: total completion tokens per
second of wall time, time to first token (first streamed text) and request latency,
p50 and p95, each mode's tokens/s over one-at-a-time's, and the server process's CPU time
with tokens per CPU second. Run it on an idle machine: other load on the CPU changes
every wall-time figure (CPU time much less, so compare runs made under different load
by tokens per CPU second).
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

    def __init__(self, model: str | None, batching: str, clients: int, threads: int | None, lm_weights: str | None):
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
        if lm_weights:
            command += ["--lm_weights", lm_weights]
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

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (user + system; Linux /proc), else None."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def one_request(client, image: str | None, question: str, max_tokens: int) -> Result:
    start = time.perf_counter()
    first = None
    tokens = 0
    parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    stream = client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
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


def workload(clients: int, per_client: int, max_tokens: int, text_share: float = 0.0) -> list[list[tuple]]:
    """Per client, its (question, max_tokens, with an image) requests; lengths spread over
    [max/2, max]; ``text_share`` of them, spread evenly, without an image."""
    plan = []
    for c in range(clients):
        requests = []
        for r in range(per_client):
            i = c * per_client + r
            share = ((i * 5) % 8) / 7  # 0 … 1, mixed across clients
            j = r * clients + c  # the order requests start in, roughly
            text_only = int((j + 1) * text_share) > int(j * text_share)
            requests.append(
                (QUESTIONS[i % len(QUESTIONS)], max(1, round(max_tokens * (0.5 + 0.5 * share))), not text_only)
            )
        plan.append(requests)
    return plan


def run(server: Server, plan, concurrent: bool, duration: float, image: str) -> tuple[list[Result], float]:
    results: list[Result] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(requests):
        for question, max_tokens, with_image in requests:
            if time.perf_counter() > stop_at:
                return
            result = one_request(server.client, image if with_image else None, question, max_tokens)
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
    parser.add_argument("--lm_weights", help="the server's --lm_weights, in every mode (default: the server's, auto)")
    parser.add_argument("--text_share", type=float, default=0.0, help="fraction of requests without an image")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of the three modes, in rotating order")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests_per_client, args.max_tokens, args.reps) < 1:
        parser.error("--clients, --requests_per_client, --max_tokens and --reps must be >= 1")
    if not 0 <= args.text_share <= 1:
        parser.error(f"--text_share must be in [0, 1], got {args.text_share}")
    model = args.model
    if args.tiny:
        model = str(tiny_checkpoint(Path(tempfile.mkdtemp())))
    image = example_image_uri()
    plan = workload(args.clients, args.requests_per_client, args.max_tokens, args.text_share)
    text_only = sum(not with_image for requests in plan for *_, with_image in requests)
    print(
        f"{args.clients} clients x {args.requests_per_client} requests ({text_only} without an image), max_tokens "
        f"{args.max_tokens // 2 or 1}-{args.max_tokens}, model {model or 'bundled'}, LM weights {args.lm_weights or 'auto'}, "
        f"{os.cpu_count()} CPUs, load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        flush=True,
    )
    modes = [
        ("one at a time", "continuous", False),
        ("static batch", "static", True),
        ("continuous", "continuous", True),
    ]
    runs: dict[str, list[tuple[list[Result], float, float | None]]] = {label: [] for label, *_ in modes}
    for rep in range(args.reps):
        # The order rotates between repetitions, so a drift in the machine's speed hits every mode alike.
        for label, batching, concurrent in modes[rep % 3 :] + modes[: rep % 3]:
            server = Server(model, batching, args.clients, args.threads, args.lm_weights)
            try:
                one_request(server.client, image, QUESTIONS[0], 2)  # warm-up
                cpu = server.cpu_seconds()
                results, wall = run(server, plan, concurrent, args.duration, image)
                cpu = None if cpu is None else server.cpu_seconds() - cpu
            finally:
                server.close()
            runs[label].append((results, wall, cpu))
            tokens = sum(r.tokens for r in results)
            print(f"  {label}: {len(results)} requests, {tokens} tokens in {wall:.1f} s", flush=True)
    header = f"{'mode':<14} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'x one':>6}"
    header += (
        f" {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8} {'CPU s':>7} {'tok/CPU s':>9} {'x one':>6}"
    )
    print("\n" + header)

    def rates(label: str) -> list[float]:
        return [sum(r.tokens for r in results) / wall for results, wall, _ in runs[label]]

    def per_cpu(label: str) -> list[float] | None:
        done = [(sum(r.tokens for r in results), cpu) for results, _, cpu in runs[label]]
        return [tokens / cpu for tokens, cpu in done] if all(cpu for _, cpu in done) else None

    base, base_cpu = rates("one at a time"), per_cpu("one at a time")
    for label, *_ in modes:
        done = runs[label]
        ttft = [r.ttft for results, _, _ in done for r in results]
        latency = [r.latency for results, _, _ in done for r in results]
        rate = rates(label)
        ratio = statistics.median(a / b for a, b in zip(rate, base))  # paired: the same repetition
        n = statistics.median(len(results) for results, _, _ in done)
        tokens = statistics.median(sum(r.tokens for r in results) for results, _, _ in done)
        line = (
            f"{label:<14} {n:>8.0f} {tokens:>7.0f} {statistics.median(w for _, w, _ in done):>7.1f}"
            f" {statistics.median(rate):>9.2f} {ratio:>6.2f}"
            f" {percentile(ttft, 50):>9.2f} {percentile(ttft, 95):>9.2f}"
            f" {percentile(latency, 50):>8.2f} {percentile(latency, 95):>8.2f}"
        )
        cpu_rate = per_cpu(label)
        if cpu_rate and base_cpu:
            cpu_s = statistics.median(cpu for _, _, cpu in done)
            cpu_ratio = statistics.median(a / b for a, b in zip(cpu_rate, base_cpu))
            line += f" {cpu_s:>7.1f} {statistics.median(cpu_rate):>9.2f} {cpu_ratio:>6.2f}"
        print(line)
    if args.reps > 1:
        for label, *_ in modes[1:]:
            each = ", ".join(f"{a / b:.2f}" for a, b in zip(rates(label), base))
            print(f"{label}: x one in each repetition: {each}")
    print(
        "(seconds; medians over the repetitions; x one: tokens/s over one at a time in the same repetition,\n"
        "median of those ratios; TTFT and latency percentiles over every repetition's requests; CPU s: the\n"
        "server process's CPU time, which other load on the machine changes less than wall time, so tok/CPU s\n"
        "compares runs made under different load)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
