"""Load test of `kninfer serve`: concurrent streaming clients, throughput, time to first token, ms/token, errors and
the server's peak memory.

    python bench/serve_load.py --bundle DIR [--bundle DIR2] --clients 4 --requests 32 --max-tokens 32
    python bench/serve_load.py --url http://HOST:PORT --model NAME ...     # a server already running (no RSS)

`--clients` threads each stream POST /v1/completions (httpx, server-sent events) until `--requests` are done, after
two untimed warm-up requests. Time to first token is from sending the request to the first text chunk; ms/token is
a request's time from its first to its last chunk over its completion tokens less one. Peak RSS is the server
process's, sampled every 10 ms with psutil while the load runs. Writes serve-load-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from latency import machine, versions  # bench/ is on the path when this runs as a script

from kninfer.atomic import atomic_path

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The state of the Union is",
    "Fellow citizens, the economy of our nation",
    "We will never forget those who",
    "Tonight I ask the Congress to",
    "Our armed forces are",
    "The American people expect",
    "In the year ahead, we must",
    "Education is the key to",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", action="append", default=[], help="A bundle to serve (started here with "
                                                                      "`kninfer serve`); repeat for more.")
    parser.add_argument("--url", help="A running server's http://HOST:PORT instead of --bundle.")
    parser.add_argument("--api-key", help="The running server's --api-key.")
    parser.add_argument("--model", help="The model to load (default: the server's first).")
    parser.add_argument("--clients", type=int, default=4, help="Concurrent streaming clients.")
    parser.add_argument("--requests", type=int, default=32, help="Requests in all, shared by the clients.")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request.")
    parser.add_argument("--temperature", type=float, default=0.0, help="temperature of each request (seeded by "
                                                                       "its number when above 0).")
    parser.add_argument("--max-concurrency", type=int, default=4, help="The server's --max-concurrency.")
    parser.add_argument("--max-queue", type=int, default=32, help="The server's --max-queue.")
    parser.add_argument("--threads", type=int, help="The server's --threads (default: all cores).")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="Where the JSON and markdown go.")
    args = parser.parse_args(argv)
    if bool(args.bundle) == bool(args.url):
        parser.error("give --bundle (a server is started) or --url (a running one), not both")
    if min(args.clients, args.requests, args.max_tokens) < 1:
        parser.error("--clients, --requests and --max-tokens must be 1 or more")
    return args


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`kninfer serve --port 0` on the bundles, and its URL once it listens."""
    command = [sys.executable, "-m", "kninfer.cli", "serve", *args.bundle, "--port", "0", "--log-level", "warning",
               "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    first = server.stdout.readline()
    if not first.startswith("kninfer serve: "):
        server.kill()
        raise SystemExit(f"the server did not start: {first!r}")
    return server, first.split()[2].removesuffix("/v1")


class PeakRss(threading.Thread):
    """The highest RSS of a process, sampled every 10 ms until `stop`."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.start_rss = self.process.memory_info().rss

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def one_request(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one completion: its timings, completion tokens, or its error."""
    start, chunks, usage, error = time.perf_counter(), [], None, None
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):  # not an OpenAI-shaped error
                code = None
            return {"error": f"HTTP {response.status_code}" + (f" {code}" if code else "")}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"].get("code") or event["error"]["message"]
            elif event["choices"] and event["choices"][0]["text"]:
                chunks.append(time.perf_counter())
            if event.get("usage") and not event["choices"]:
                usage = event["usage"]
    end = time.perf_counter()
    if error is not None or usage is None or not chunks:
        return {"error": error or "no text or no usage chunk"}
    tokens = usage["completion_tokens"]
    return {"ttft_ms": (chunks[0] - start) * 1e3, "latency_s": end - start, "tokens": tokens,
            "ms_per_token": (chunks[-1] - chunks[0]) * 1e3 / (tokens - 1) if tokens > 1 else None}


def load(args: argparse.Namespace, url: str, model: str) -> tuple[list[dict[str, Any]], float]:
    """--requests requests from --clients threads; each request's outcome, and the wall time."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    numbers, lock, outcomes = iter(range(args.requests)), threading.Lock(), []

    def body(number: int) -> dict[str, Any]:
        sampled = {"seed": number} if args.temperature > 0 else {}
        return {"model": model, "prompt": PROMPTS[number % len(PROMPTS)], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}, **sampled}

    def client_loop() -> None:
        with httpx.Client(headers=headers, timeout=600) as client:
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                request = body(number)
                try:
                    outcome = one_request(client, url, request)
                except httpx.HTTPError as error:
                    outcome = {"error": type(error).__name__}
                with lock:
                    outcomes.append({"number": number, "prompt": request["prompt"], **outcome})

    with httpx.Client(headers=headers, timeout=600) as client:
        for number in range(2):  # warm-up: onnxruntime's first runs allocate
            one_request(client, url, body(number))
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - start


def percentiles(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    return {f"p{q}": (float(np.percentile(values, q)) if values else None) for q in qs}


def summarise(outcomes: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Requests/s, tokens/s, TTFT, ms/token and latency percentiles over the requests that succeeded; errors."""
    ok = [o for o in outcomes if "error" not in o]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if "error" in outcome:
            errors[outcome["error"]] = errors.get(outcome["error"], 0) + 1
    return {"requests": len(outcomes), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": wall_s, "requests_per_s": len(ok) / wall_s,
            "tokens_per_s": sum(o["tokens"] for o in ok) / wall_s,
            "completion_tokens_mean": float(np.mean([o["tokens"] for o in ok])) if ok else None,
            "ttft_ms": percentiles([o["ttft_ms"] for o in ok], (50, 90, 99)),
            "ms_per_token": percentiles([o["ms_per_token"] for o in ok if o["ms_per_token"] is not None], (50, 90)),
            "latency_s": percentiles([o["latency_s"] for o in ok], (50, 90, 99))}


def markdown(results: dict[str, Any]) -> str:
    """The results as a table and the settings they came from."""
    s, r, m = results["settings"], results["summary"], results["machine"]
    rss = results["server_rss_bytes"]

    def fmt(value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    def mb(value: int | None) -> str:
        return "–" if value is None else f"{value / 1e6:,.0f}"

    return "\n".join([
        f"## Serving load ({m['cpu']}, {m['logical_cores']} cores)", "",
        f"`{' '.join(results['command'])}`", "",
        f"{s['clients']} streaming clients, {s['requests']} requests of max_tokens {s['max_tokens']} (temperature "
        f"{s['temperature']:g}) on `{s['model']}`; server --max-concurrency {s['max_concurrency']}, --max-queue "
        f"{s['max_queue']}, --threads {s['threads'] or 'all cores'}. Time to first token: request sent to first text "
        "chunk; ms/token: first to last chunk over completion tokens less one, per request; peak RSS: the server "
        "process, sampled every 10 ms.", "",
        "| requests/s | tokens/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ms/token p50 | ms/token p90 | "
        "latency p50 s | latency p90 s | errors | server RSS before MB | server peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {fmt(r['requests_per_s'], 2)} | {fmt(r['tokens_per_s'])} | {fmt(r['ttft_ms']['p50'])} | "
        f"{fmt(r['ttft_ms']['p90'])} | {fmt(r['ttft_ms']['p99'])} | {fmt(r['ms_per_token']['p50'], 2)} | "
        f"{fmt(r['ms_per_token']['p90'], 2)} | {fmt(r['latency_s']['p50'], 2)} | {fmt(r['latency_s']['p90'], 2)} | "
        f"{r['errors']} | {mb(rss['start'])} | {mb(rss['peak'])} |", "",
        f"{r['ok']} of {r['requests']} requests succeeded in {r['wall_s']:.1f} s, {fmt(r['completion_tokens_mean'])} "
        "completion tokens each on average" + (f"; errors: {r['error_kinds']}" if r["errors"] else "") + ".",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    server, url = start_server(args) if args.bundle else (None, args.url.rstrip("/"))
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        rss = PeakRss(server.pid) if server else None
        if rss:
            rss.start()
        outcomes, wall_s = load(args, url, model)
        peak = rss.stop() if rss else None
    finally:
        if server:
            server.terminate()
            server.wait(30)
    results = {
        "schema": "kninfer-bench-serve-load", "schema_version": 1,
        "command": [Path(sys.executable).name, "bench/serve_load.py", *(argv if argv is not None else sys.argv[1:])],
        "started": started.isoformat(timespec="seconds"), "machine": machine(args.threads or psutil.cpu_count()),
        "versions": versions() | {name: _version(name) for name in ("fastapi", "uvicorn", "httpx")},
        "settings": {"model": model, "bundles": args.bundle, "url": args.url, "clients": args.clients,
                     "requests": args.requests, "max_tokens": args.max_tokens, "temperature": args.temperature,
                     "max_concurrency": args.max_concurrency if server else None,
                     "max_queue": args.max_queue if server else None, "threads": args.threads},
        "summary": summarise(outcomes, wall_s),
        "server_rss_bytes": {"start": rss.start_rss if rss else None, "peak": peak},
        "requests": outcomes,
    }
    results["markdown"] = markdown(results)
    stem = args.out_dir / f"serve-load-{started.strftime('%Y%m%d-%H%M%S')}"
    with atomic_path(f"{stem}.md") as tmp:
        tmp.write_text(results["markdown"] + "\n")
    with atomic_path(f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n")
    print(results["markdown"])
    print(f"wrote {stem}.json, .md", file=sys.stderr)
    below_limit = server is None or args.clients <= args.max_concurrency + args.max_queue
    return 1 if below_limit and results["summary"]["errors"] else 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
