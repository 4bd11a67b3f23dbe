#!/usr/bin/env python3
"""Overhead of running a recipe on Ray: `appliance run RECIPE --ray local` (one actor on this machine)
against the same recipe in-process, measured side by side in one sitting.

Each run is a fresh `appliance` process with its own new database (the same recipe, seed and item
count, so the same requests). Reported per method: the wall time of the whole command, the generation
rate the run prints ("this session: ... tok/s", model load excluded) and the ratio to in-process.
Runs alternate (in-process, Ray, in-process, Ray, ...) so a slow moment hits both.

    python scripts/bench_ray.py [--count 48] [--repeats 2] [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance.recipes.retry import ITEM_LIMIT  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
APPLIANCE = str(Path(sys.executable).with_name("appliance"))


def one_run(recipe: Path, folder: Path, tag: str, ray: bool) -> tuple[float, float, float]:
    db = folder / f"{tag}.db"
    args = [APPLIANCE, "--db", str(db), "run", str(recipe), "--quiet"] + (["--ray", "local"] if ray else [])
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr}")
    found = re.search(r"this session: (\d+) outputs, (\d+) tokens, ([\d.]+) tok/s", proc.stderr)
    if not found:
        sys.exit(f"no rate in the output of {' '.join(args)}:\n{proc.stderr}")
    return wall, float(found[3]), steady_rate(db)


def steady_rate(db: Path) -> float:
    """Completion tok/s of the recipe's main stage from its first stored row to its last: generation once
    running, without start-up (Ray's, the model load) and without the later check stages."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT created_at, tokens_out FROM generations WHERE item_index < ? ORDER BY created_at",
                            [ITEM_LIMIT]).fetchall()
    finally:
        conn.close()
    first, last = (datetime.fromisoformat(rows[i][0]) for i in (0, -1))
    return sum(t for _, t in rows[1:]) / max((last - first).total_seconds(), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=48, help="items of the recipe (synthetic-reviews)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--docs", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("recipes", "prompts"):
            shutil.copytree(REPO / name, folder / name)
        text = (REPO / "recipes/synthetic-reviews.toml").read_text()
        text = re.sub(r"^count = .*$", f"count = {args.count}", text, count=1, flags=re.M)
        recipe = folder / "recipes" / "bench-ray.toml"
        recipe.write_text(text)
        results: dict[str, list[tuple[float, float, float]]] = {"in-process": [], "ray local, 1 actor": []}
        for i in range(args.repeats):
            for name, ray in (("in-process", False), ("ray local, 1 actor", True)):
                results[name].append(one_run(recipe, folder, f"{'ray' if ray else 'local'}{i}", ray))
                wall, rate, steady = results[name][-1]
                print(f"# {name} #{i + 1}: wall {wall:.1f} s, {rate:.1f} tok/s, main stage once running {steady:.1f} tok/s", flush=True)
    med = {name: [statistics.median(r[k] for r in rows) for k in range(3)] for name, rows in results.items()}
    base = med["in-process"]
    lines = [
        f"| method (median of {args.repeats}) | wall | x in-process | generation tok/s | x in-process | main stage once running, tok/s | x in-process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (wall, rate, steady) in med.items():
        lines.append(f"| {name} | {wall:.1f} s | {wall / base[0]:.2f} | {rate:.1f} | {rate / base[1]:.2f} | {steady:.1f} | {steady / base[2]:.2f} |")
    ray_med = med["ray local, 1 actor"]
    summary = (f"Ray overhead: {ray_med[0] / base[0] - 1:+.1%} wall time of the whole command (Ray start-up and actor start "
               f"included), {1 - ray_med[1] / base[1]:+.1%} generation rate (every stage, model load included), "
               f"{1 - ray_med[2] / base[2]:+.1%} once the main stage runs; {args.count} items, recipes/synthetic-reviews.toml.")
    table = "\n".join(lines)
    print(table)
    print(summary)
    if args.docs:
        machine = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
        with args.docs.open("a") as fh:
            fh.write(f"\n`python scripts/bench_ray.py --count {args.count} --repeats {args.repeats}` ({time.strftime('%Y-%m-%d')}, {machine}):\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
