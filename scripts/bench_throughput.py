#!/usr/bin/env python3
"""Throughput of bulk generation behind a shared few-shot prefix, measured side by side in one run.

Workload (DESIGN §4): the demo model, a ~380-token shared prefix (a passage of Coriolanus and an
instruction), 32 requests each with its own short suffix, 48 new tokens at most, temperature 0.8.

Each method runs in its own subprocess so that its peak RSS is its own:
  naive      llama-cpp-python's high-level create_completion, one request after another (the baseline)
  engine:N   the appliance engine with N parallel sequences (and N = the planner's choice)
  server:N   llama.cpp's C++ server with N slots, cold (first pass) and warm (second pass), when
             --server PATH names a llama-server binary (how to build one offline: docs/benchmarks.md)

Prints a Markdown table: completion tok/s, ratio to the naive loop, peak RSS, and for the engine the
share of wall time spent in store writes (every output is written through the real writer thread
into a temporary SQLite file). `--docs FILE` appends the table, with the machine, to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N_REQUESTS = 32
MAX_TOKENS = 48
TEMPERATURE = 0.8


def workload() -> list[str]:
    text = (REPO / "recipes" / "sources" / "coriolanus-act1-excerpt.txt").read_text()
    passage = text[:1350]
    prefix = f"Read the passage, then answer each question in one sentence.\n\n{passage}\n\n"
    topics = ["the citizens", "Caius Marcius", "corn", "the patricians", "Menenius", "the belly", "the senate", "hunger"]
    return [f"{prefix}Question {i + 1}: What does the passage say about {topics[i % len(topics)]}?\nAnswer:" for i in range(N_REQUESTS)]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ workers


def worker_naive(model: str) -> dict:
    from llama_cpp import Llama

    prompts = workload()
    llm = Llama(model_path=model, n_ctx=1024, n_threads=os.cpu_count() or 2, n_batch=512, verbose=False, seed=1)
    start = time.perf_counter()
    tokens = 0
    for i, prompt in enumerate(prompts):
        out = llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_p=0.95, top_k=40, min_p=0.05, seed=1000 + i)
        tokens += out["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "peak_rss": peak_rss()}


def worker_engine(model: str, n_parallel: int | None) -> dict:
    from appliance.engine import Engine, Request, SamplingParams, count_prompt_tokens
    from appliance.gguf_reader import read_gguf
    from appliance.hardware import detect_hardware
    from appliance.planner import make_plan
    from appliance.store import Store, Writer, utcnow

    prompts = workload()
    prefix, suffix = count_prompt_tokens(model, prompts)
    plan = make_plan(read_gguf(model), detect_hardware(), n_parallel=n_parallel, prefix_tokens=prefix,
                     seq_tokens=suffix + MAX_TOKENS, max_parallel=len(prompts)).require()
    params = SamplingParams(temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        run_id = store.start_run(kind="generate", requested=len(prompts))
        with Engine(model, plan) as engine:
            writer = Writer(store.path)
            start = time.perf_counter()
            tokens = 0
            requests = [Request(key=i, prompt=p, seed=1000 + i) for i, p in enumerate(prompts)]
            for done in engine.generate(requests, params):
                tokens += done.tokens_out
                writer.put({"run_id": run_id, "item_key": f"{run_id}:{done.key}", "item_index": done.key,
                            "rendered_prompt": prompts[done.key], "output": done.text, "seed": done.seed,
                            "tokens_in": done.tokens_in, "tokens_out": done.tokens_out, "ms": done.ms,
                            "finish_reason": done.finish_reason, "parallel": done.parallel, "created_at": utcnow()})
            seconds = time.perf_counter() - start
            stats = writer.close()
    return {"tokens": tokens, "seconds": seconds, "peak_rss": peak_rss(), "n_parallel": plan.n_parallel,
            "n_ctx": plan.n_ctx, "write_share": stats.seconds / seconds, "shared_prefix": engine.stats.shared_prefix_tokens}


def worker_server(model: str, binary: str, n_parallel: int) -> dict:
    import psutil

    prompts = workload()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = n_parallel * 1024
    proc = subprocess.Popen(
        [binary, "-m", model, "-np", str(n_parallel), "-c", str(ctx), "-t", str(os.cpu_count() or 2),
         "--host", "127.0.0.1", "--port", str(port), "-cram", "0", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        peak = [0]

        def watch(stop: threading.Event) -> None:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.05)

        def one_pass() -> tuple[int, float]:
            tokens = [0]
            lock = threading.Lock()
            queue = list(enumerate(prompts))

            def client() -> None:
                while True:
                    with lock:
                        if not queue:
                            return
                        i, prompt = queue.pop(0)
                    body = json.dumps({"prompt": prompt, "n_predict": MAX_TOKENS, "temperature": TEMPERATURE,
                                       "top_p": 0.95, "top_k": 40, "min_p": 0.05, "seed": 1000 + i, "cache_prompt": True}).encode()
                    req = urllib.request.Request(f"{base}/completion", body, {"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=600) as r:
                        data = json.loads(r.read())
                    with lock:
                        tokens[0] += data.get("tokens_predicted", 0)

            start = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(n_parallel)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return tokens[0], time.perf_counter() - start

        stop = threading.Event()
        threading.Thread(target=watch, args=(stop,), daemon=True).start()
        cold = one_pass()
        warm = one_pass()
        stop.set()
        return {"cold": {"tokens": cold[0], "seconds": cold[1]}, "warm": {"tokens": warm[0], "seconds": warm[1]}, "peak_rss": peak[0]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------- driver


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"# {args[0]} {' '.join(args[2:])}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: the demo model)")
    parser.add_argument("--parallel", default="1,4,8,16", help="engine parallelism to try besides the planner's")
    parser.add_argument("--server", help="path to a llama-server binary for the side-by-side comparison")
    parser.add_argument("--docs", help="append the results to this Markdown file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, model, *rest = args.worker
        if kind == "naive":
            result = worker_naive(model)
        elif kind == "engine":
            result = worker_engine(model, int(rest[0]) if rest and rest[0] != "auto" else None)
        else:
            result = worker_server(model, rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    if args.model:
        model = args.model
    else:
        sys.path.insert(0, str(REPO))
        from appliance.models import demo_model_path

        model = str(demo_model_path())
    rows: list[tuple[str, float, int, str]] = []
    naive = run_worker(["naive", model])
    base = naive["tokens"] / naive["seconds"]
    rows.append(("naive high-level loop (baseline)", base, naive["peak_rss"], "-"))
    auto = run_worker(["engine", model, "auto"])
    results = {f"engine, planner's choice (N={auto['n_parallel']}, ctx {auto['n_ctx']})": auto}
    for n in [int(x) for x in args.parallel.split(",") if x]:
        results[f"engine N={n}"] = run_worker(["engine", model, str(n)])
    for name, r in results.items():
        rows.append((name, r["tokens"] / r["seconds"], r["peak_rss"], f"{r['write_share']:.2%}"))
    if args.server:
        for n in sorted({auto["n_parallel"], 8}):
            s = run_worker(["server", model, args.server, str(n)])
            rows.append((f"llama-server {n} slots, cold", s["cold"]["tokens"] / s["cold"]["seconds"], s["peak_rss"], "-"))
            rows.append((f"llama-server {n} slots, warm", s["warm"]["tokens"] / s["warm"]["seconds"], s["peak_rss"], "-"))

    import llama_cpp

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}, llama-cpp-python {llama_cpp.__version__}"
    lines = [
        f"Workload: {N_REQUESTS} requests, {auto['shared_prefix']}-token shared prefix, {MAX_TOKENS} new tokens at most, "
        f"temperature {TEMPERATURE}; model {Path(model).name}; machine: {machine}.",
        "",
        "| method | completion tok/s | x naive | peak RSS | store writes / wall |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {tps:.1f} | {tps / base:.2f} | {mib(rss)} | {share} |" for name, tps, rss, share in rows]
    table = "\n".join(lines)
    print(table)
    if args.docs:
        with open(args.docs, "a", encoding="utf-8") as fh:
            fh.write(f"\n### Throughput, {time.strftime('%Y-%m-%d')}\n\n{table}\n")


if __name__ == "__main__":
    main()
