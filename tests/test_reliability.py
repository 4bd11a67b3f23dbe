"""Crash safety, signals and concurrent access, with real processes, the real model and real SQLite."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from appliance.recipes.fidelity import FIDELITY_BASE
from appliance.recipes.retry import ITEM_LIMIT

REPO = Path(__file__).resolve().parent.parent
APPLIANCE = str(Path(sys.executable).with_name("appliance"))


def recipe(workdir: Path, count: int, name: str = "crash") -> Path:
    shutil.copytree(REPO / "recipes", workdir / "recipes", dirs_exist_ok=True)
    text = (workdir / "recipes" / "synthetic-reviews.toml").read_text()
    text = text.replace("count = 24", f"count = {count}").replace('name = "synthetic-reviews"', f'name = "{name}"')
    text = text.replace("max_tokens = 64", "max_tokens = 24")
    path = workdir / "recipes" / f"{name}.toml"
    path.write_text(text)
    return path


def start(args: list[str], db: Path) -> subprocess.Popen:
    env = {**os.environ, "APPLIANCE_DB": str(db)}
    return subprocess.Popen([APPLIANCE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_exactly_n(workdir):
    n = 24
    path = recipe(workdir, n)
    db = workdir / "crash.db"
    rng = random.Random(20261124)
    kills = 0
    stored = []
    while kills < 10:
        proc = start(["run", str(path), "--quiet", "--parallel", "2"], db)
        if kills % 2 == 0:  # anywhere from start-up (migrations, model load) on
            time.sleep(rng.uniform(0.2, 3.0))
        else:  # while rows are being written: after the next row lands, at a random moment
            before = stored[-1] if stored else 0
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and _count(db) <= before:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:  # the run finished before the kill
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if db.exists():
            assert integrity(db) == "ok"
            stored.append(sqlite_utils.Database(db)["generations"].count)
    final = start(["run", str(path), "--quiet", "--parallel", "2"], db)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    d = sqlite_utils.Database(db)
    assert integrity(db) == "ok"
    runs = list(d["runs"].rows)
    assert len(runs) == 1 and runs[0]["status"] == "completed", runs
    gens = list(d.query("select item_index, item_key, output from generations"))
    items = [g for g in gens if g["item_index"] < ITEM_LIMIT]  # the recipe's items, not retries or fidelity checks
    assert len(items) == n
    assert len({g["item_index"] for g in items}) == n and len({g["item_key"] for g in gens}) == len(gens)
    checks = [g["item_index"] for g in gens if g["item_index"] >= FIDELITY_BASE]
    assert 0 < len(checks) == len(set(checks)) <= n  # each final output labelled once, also across kills
    assert d["examples"].count == n and d["verdicts"].count >= n
    print(f"{kills} SIGKILLs; generations stored after each kill: {stored}")
    assert kills >= 5
    assert stored == sorted(stored)  # nothing stored is ever lost
    assert len(set(stored)) >= 3  # kills landed at several points of the run, not only at start-up


def _count(db: Path) -> int:
    try:
        return sqlite_utils.Database(db)["generations"].count if db.exists() else 0
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_cleanly_and_resume(workdir, sig):
    path = recipe(workdir, 40, name=f"sig{int(sig)}")
    db = workdir / "sig.db"
    proc = start(["run", str(path), "--quiet", "--parallel", "2"], db)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some rows are in
        time.sleep(0.3)
        if db.exists():
            try:
                if sqlite_utils.Database(db)["generations"].count >= 2:
                    break
            except sqlite3.OperationalError:
                pass
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted") and "Traceback" not in err
    d = sqlite_utils.Database(db)
    run = next(iter(d["runs"].rows))
    assert run["status"] == "interrupted"
    done = d["generations"].count
    assert 2 <= done < 40
    resumed = start(["run", "--resume", str(run["id"]), str(path), "--quiet"], db)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    items = d.execute(f"select count(*) from generations where item_index < {ITEM_LIMIT}").fetchone()[0]
    assert items == 40 and next(iter(d["runs"].rows))["status"] == "completed"


@pytest.mark.slow
def test_readers_and_a_second_writer_while_a_run_writes(workdir):
    path = recipe(workdir, 30, name="load")
    db = workdir / "load.db"
    env = {**os.environ, "APPLIANCE_DB": str(db)}
    writer = start(["run", str(path), "--quiet", "--parallel", "2"], db)
    while not db.exists():
        time.sleep(0.1)
    time.sleep(1.0)
    second = start(["generate", "prompts/product-review.md", "-m", "gemma-3-270m-q4_k_m", "-n", "6", "--max-tokens", "16"], db)
    readers = [
        [APPLIANCE, "logs", "-n", "2"],
        [APPLIANCE, "runs"],
        [sys.executable, "-m", "sqlite_utils", "query", str(db), "select count(*) from generations"],
        [APPLIANCE, "db", "check"],
    ]
    attempts = errors = locked = 0
    deadline = time.time() + 90
    while (writer.poll() is None or second.poll() is None) and time.time() < deadline and attempts < 200:
        for cmd in readers:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
            attempts += 1
            if out.returncode != 0:
                errors += 1
                locked += "locked" in out.stderr
    _, err1 = writer.communicate(timeout=600)
    _, err2 = second.communicate(timeout=600)
    print(f"concurrent readers: {attempts} attempts, {errors} errors, {locked} 'database is locked'")
    assert writer.returncode == 0, err1
    assert second.returncode == 0, err2
    assert attempts >= 8 and errors == 0 and locked == 0
    d = sqlite_utils.Database(db)
    items = d.execute(f"select count(*) from generations where item_index < {ITEM_LIMIT}").fetchone()[0]
    assert items == 36 and integrity(db) == "ok"  # 30 recipe items and 6 generated (retries and checks aside)


def test_decode_failure_marks_the_run_failed_and_keeps_earlier_rows(run_cli, demo_model, monkeypatch):
    """llama.cpp failing mid-run (here: llama_decode returning an error after some outputs)."""
    from appliance.engine.batch import Batch

    real = Batch.decode
    calls = {"n": 0}

    def failing(self, stats):
        calls["n"] += 1
        return -3 if calls["n"] > 40 else real(self, stats)

    monkeypatch.setattr(Batch, "decode", failing)
    result = run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "12", "--max-tokens", "24",
                     "--parallel", "2", "--seed", "1", ok=False)
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: llama_decode failed (code -3)") and "try a smaller --parallel or --ctx" in line
    run = run_cli.table("runs")[0]
    assert run["status"] == "failed" and "llama_decode failed" in run["error"]
    kept = run_cli.table("generations")
    assert 1 <= len(kept) < 12  # the outputs finished before the failure stay


def test_a_full_disk_is_a_clear_error_and_corrupts_nothing(tmp_path, demo_model):
    """A database on a tiny tmpfs that fills up while a run writes."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        db = mnt / "a.db"
        prompt = tmp_path / "long.md"
        prompt.write_text("+++\nmax_tokens = 64\n+++\n" + ("Words of a long shared prompt. " * 300) + "\nContinue:")
        env = {**os.environ, "APPLIANCE_DB": str(db)}
        out = subprocess.run([APPLIANCE, "generate", str(prompt), "-m", str(demo_model), "-n", "200", "--max-tokens", "4"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("Error: cannot write database") and "disk is full" in out.stderr
        assert "Traceback" not in out.stderr
        assert integrity(db) == "ok"
        with sqlite3.connect(db) as conn:
            written = conn.execute("SELECT count(*) FROM generations").fetchone()[0]
        conn.close()
        assert 0 < written < 200  # what was written before the disk filled stays
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
