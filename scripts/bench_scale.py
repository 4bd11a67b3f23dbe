#!/usr/bin/env python3
"""Every command after generation, on a database grown to 1k / 10k / 100k items (issue 22).

For each size, a real run is grown through the project's own code: `recipes/synthetic-reviews.toml` with
its `count` raised to the size (and without its fidelity check, which would need the model), its items
built by the recipe builder (`build_items`, timed: build_items_s), one generation per item written by the
store's writer thread (`row_for` over a `Completion`: near-unique reviews, about 5% of them one word away
from an earlier one), judged by the recipe's filters (`judge`, `store_judgement`) and marked completed.
No model is loaded: the texts stand in for the model's.

Then each command runs in its own process (`python -m appliance --db DB ...`), timed from start to exit,
with its peak RSS (`os.wait4`):
  export       `export RUN --split train=0.9,test=0.1` (export_s, export_rss_mb), against its floor: a
               process that reads the kept rows with `sqlite3` and writes them as JSONL with `json`
               (export_floor_s), the least any export of those rows can cost
  rerun        `run RECIPE` on the completed run (rerun_complete_s, rerun_complete_rss_mb)
  report       `report RUN --out FILE` (report_s, report_bytes)
and in a worker process each:
  logs         the query behind `logs --run RUN -n 20`, `logs -q review -n 20` (every row matches) and
               `logs -q WORD -n 20` (a word of one review): the slowest, best of 3 each (logs_ms)
  browse       the `generations` table page from `appliance browse`'s Datasette, after one request to the
               database page, the slowest of 3 (browse_table_s)

Prints a Markdown table per size, then the ratios the targets are stated in (export against its floor,
100k against 10k). `--json FILE` writes {size: {key: value}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SPLIT = "train=0.9,test=0.1"
NEAR_DUP_SHARE = 0.05

FLOOR = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
with open(sys.argv[3], "w") as f:
    for ins, inp, out, system in conn.execute(
            "SELECT instruction, input, output, system FROM examples WHERE run_id = ? AND kept = 1 ORDER BY id", [int(sys.argv[2])]):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": ins + ("\\n\\n" + inp if inp else "")}, {"role": "assistant", "content": out}]
        f.write(json.dumps({"messages": messages}) + "\\n")
"""


def review_texts(n: int, seed: int = 22) -> list[str]:
    """`n` reviews of 25-60 words from a 4,000-word vocabulary; about 5% repeat an earlier review with
    its last word changed (estimated Jaccard 0.92-0.97: a near duplicate at the default 0.8)."""
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfglmnprst')}{rng.choice('aeiou')}{rng.choice('klmnrst')}{i:x}" for i in range(4000)]
    texts: list[str] = []
    for _ in range(n):
        if texts and rng.random() < NEAR_DUP_SHARE:
            words = rng.choice(texts).split()
            words[-1] = rng.choice(vocab)  # one shingle of 25-60 changed: estimated Jaccard 0.92-0.97
        else:
            words = [rng.choice(vocab) for _ in range(rng.randint(25, 60))]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def scale_recipe(tmp: Path, n: int) -> Path:
    """The shipped synthetic recipe with `count = n`, its prompt path absolute and no fidelity check."""
    text = (REPO / "recipes" / "synthetic-reviews.toml").read_text()
    text = re.sub(r"(?m)^count = \d+", f"count = {n}", text)
    text = re.sub(r'(?m)^name = ".*"', f'name = "scale-{n}"', text)
    text = text.replace('prompt = "../prompts/', f'prompt = "{REPO}/prompts/')
    text = re.sub(r"(?m)^fidelity.*\n", "", text)
    path = tmp / f"scale-{n}.toml"
    path.write_text(text)
    return path


def grow(db: Path, recipe_path: Path, n: int) -> tuple[int, float]:
    """A completed run of `n` judged generations made through the project's own code; (run id, build_items_s)."""
    from appliance.engine.types import Completion
    from appliance.models.registry import Registry
    from appliance.prompts.files import load_prompt, sampling_for
    from appliance.recipes.build import build_items
    from appliance.recipes.judge import judge, store_judgement
    from appliance.recipes.recipe import load_recipe
    from appliance.recipes.run import JUDGED_COLUMNS
    from appliance.runs.items import row_for
    from appliance.runs.style import style_for
    from appliance.store import Store, Writer

    store = Store(db)
    loaded = load_recipe(recipe_path)
    recipe = loaded.recipe
    prompt = load_prompt(loaded.resolve(recipe.prompt))
    registry = Registry(store)
    record = registry.resolve(recipe.model)
    style = style_for(record, prompt=prompt, mode=recipe.mode, chat_template=recipe.chat_template, system=recipe.system)
    params = sampling_for(prompt, recipe.sampling.model_dump(exclude={"stop"}))
    start = time.perf_counter()
    items = build_items(loaded, prompt, [], style)
    build_s = time.perf_counter() - start
    prompt_id = store.save_prompt(prompt.name, prompt.text, prompt.sha256, prompt.path)
    run_id = store.start_run(
        kind=recipe.kind, name=recipe.name, recipe_sha256=loaded.sha256, model_id=record.id,
        model_sha256=registry.ensure_sha256(record), prompt_id=prompt_id, requested=len(items), variables=recipe.vars,
        params={**params.model_dump(), "seed": recipe.seed}, schema=None,
        config={"recipe_path": loaded.path, "recipe": recipe.model_dump(by_alias=True)}, **style.run_fields())
    writer = Writer(store.path)
    for item, text in zip(items, review_texts(n)):
        words = len(text.split())
        done = Completion(key=item.index, seed=item.seed, text=" " + text, tokens_in=180, tokens_out=words * 2,
                          finish_reason="stop", ms=words * 40, parallel=8)
        writer.put(row_for(run_id, prompt_id, item, done))
    writer.close()
    gens = store.rows(f"SELECT {JUDGED_COLUMNS} FROM generations WHERE run_id = ? ORDER BY item_index", [run_id])
    store_judgement(store, run_id, recipe, judge(recipe, gens, {}, None))
    store.finish_run(run_id, "completed")
    store.close()
    return run_id, build_s


def timed(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one process, which must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args[2:])} failed:\n{err}")
    return seconds, usage.ru_maxrss / 1024


def logs_ms(db: Path, run_id: int) -> float:
    from appliance.runs.queries import search_generations
    from appliance.store import Store

    store = Store(db, readonly=True)
    worst = 0.0
    for kwargs in ({"run_id": run_id}, {"query": "review"}, {"query": review_texts(1)[0].split()[3]}):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            rows = search_generations(store, limit=20, **kwargs)
            best = min(best, time.perf_counter() - start)
        assert rows, kwargs
        worst = max(worst, best)
    store.close()
    return worst * 1000


def browse_table_s(db: Path) -> float:
    from appliance.views.browse import make_datasette

    ds = make_datasette(db)

    async def pages() -> float:
        await ds.client.get(f"/{db.stem}")
        worst = 0.0
        for _ in range(3):
            start = time.perf_counter()
            response = await ds.client.get(f"/{db.stem}/generations")
            worst = max(worst, time.perf_counter() - start)
            assert response.status_code == 200, response.status_code
        return worst

    return asyncio.run(pages())


def worker(name: str, *args: str) -> Any:
    """One in-process measurement, in a process of its own (so this one stays small: a child's peak RSS
    starts from its parent's size at fork)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", name, *args], capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(tmp: Path, n: int) -> dict[str, float]:
    db = tmp / f"scale-{n}.db"
    recipe = scale_recipe(tmp, n)
    start = time.perf_counter()
    run_id, build_s = worker("grow", str(db), str(recipe), str(n))
    print(f"{n:,} items: grown in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    app = [sys.executable, "-m", "appliance", "--db", str(db)]
    out: dict[str, float] = {"build_items_s": build_s}
    out["export_floor_s"], _ = timed([sys.executable, "-c", FLOOR, str(db), str(run_id), str(tmp / "floor.jsonl")])
    out["export_s"], out["export_rss_mb"] = timed([*app, "export", str(run_id), "--out", str(tmp / f"out-{n}.jsonl"),
                                                   "--split", SPLIT, "--force"])
    out["rerun_complete_s"], out["rerun_complete_rss_mb"] = timed([*app, "run", str(recipe)])
    report = tmp / f"report-{n}.html"
    out["report_s"], _ = timed([*app, "report", str(run_id), "--out", str(report)])
    out["report_bytes"] = report.stat().st_size
    out["logs_ms"] = worker("logs", str(db), str(run_id))
    out["browse_table_s"] = worker("browse", str(db))
    return out


ROWS = [
    ("export (s)", "export_s"), ("export floor: sqlite3 + json (s)", "export_floor_s"), ("export peak RSS (MB)", "export_rss_mb"),
    ("re-run of a complete run (s)", "rerun_complete_s"), ("re-run peak RSS (MB)", "rerun_complete_rss_mb"),
    ("report (s)", "report_s"), ("report size (bytes)", "report_bytes"), ("logs -n 20, query (ms)", "logs_ms"),
    ("Datasette generations page (s)", "browse_table_s"), ("build items (s)", "build_items_s"),
]


def table(results: dict[int, dict[str, float]]) -> str:
    sizes = sorted(results)
    lines = ["| measure | " + " | ".join(f"{n:,} items" for n in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{results[n][key]:,.3g}" if results[n][key] < 1000 else f"{results[n][key]:,.0f}"
                                                  for n in sizes) + " |")
    lines.append("| export / floor | " + " | ".join(f"{results[n]['export_s'] / results[n]['export_floor_s']:.2f}x" for n in sizes) + " |")
    if len(sizes) >= 2:
        lo, hi = sizes[-2], sizes[-1]
        growth = ", ".join(f"{key} {results[hi][key] / results[lo][key]:.1f}x" for _, key in ROWS if results[lo][key])
        lines.append(f"\n{hi:,} against {lo:,} items ({hi // lo}x the items): {growth}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="10000,100000", help="comma-separated run sizes (default: 10000,100000)")
    parser.add_argument("--json", dest="json_out", help="write {size: {export_s, ...}} to this JSON file")
    parser.add_argument("--keep", help="keep the databases, recipes and exports in this folder")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, *rest = args.worker
        if name == "grow":
            print(json.dumps(grow(Path(rest[0]), Path(rest[1]), int(rest[2]))))
        else:
            print(json.dumps(logs_ms(Path(rest[0]), int(rest[1])) if name == "logs" else browse_table_s(Path(rest[0]))))
        return
    sizes = [int(s) for s in args.items.split(",")]
    start = time.perf_counter()
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            results[n] = measure(folder, n)
    print(table(results))
    print(f"\nwhole bench: {time.perf_counter() - start:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({str(n): r for n, r in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
