"""The README, executed: its ```sh blocks are followed in order, in a fresh folder with a fresh database,
as a newcomer would after `scripts/install.sh`; and what it says about the CLI, the files an export
writes and the database's tables is checked against the code.

Block markers: a block right after `<!-- readme-test: skip (REASON) -->` is not run (installs, docker,
the test suite itself); every other ```sh block must exit 0. Commands name runs by `last` or by a
recipe's name, never by an id known in advance; the test still exports `RUN_ID` (the last `run N` a
command printed) to later blocks, so a block may use `$RUN_ID` as a reader would.

Runtime: the README's recipes and task spec are copied into the folder with smaller counts (`SMALLER`;
the task spec also with one answer per input instead of three); `README_TEST_FULL=1` runs them as
shipped (several minutes on 2 cores). Each block's time is printed (`pytest -s`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from appliance.cli import cli
from appliance.store.database import Store

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->$")
RUN_PRINTED = re.compile(r"^run (\d+)\b", re.M)
# file -> (text as shipped, text in this test): each a minute or more of the demo model's time less
SMALLER = {
    "recipes/synthetic-reviews.toml": [("count = 24", "count = 6")],
    "recipes/annotated-coriolanus.toml": [("count = 16", "count = 2")],
    "recipes/augmented-qa.toml": [("count = 16", "count = 6")],  # 2-3 may keep nothing (grounding): the run exits 1
    "tasks/smart-home.toml": [("count = 40", "count = 16"), ("samples = 3", "samples = 1")],
    "recipes/instruct-explanations.toml": [("count = 12", "count = 4")],
    "recipes/magpie-smollm2.toml": [("count = 12", "count = 4")],
    "recipes/preference-explanations.toml": [("count = 8", "count = 4")],
}


@dataclass
class Block:
    line: int  # where the block starts in README.md
    code: str
    skip: str | None  # the reason given in the marker before it


def sh_blocks(text: str) -> list[Block]:
    """Every ```sh block in order, with the skip reason of a marker on the line before it (blank lines between are fine)."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            match = SKIP.match(before)
            blocks.append(Block(start + 1, "\n".join(body), match.group("why") if match else None))
        i += 1
    return blocks


def commands(block: Block) -> list[str]:
    return [line.split(" #")[0].strip() for line in block.code.splitlines() if line.strip() and not line.strip().startswith("#")]


def section(text: str, title: str) -> str:
    """The text of one `## title` section."""
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S).group(1)


# -------------------------------------------------------------------------------------- static checks


def test_blocks_are_found_and_every_skip_gives_its_reason():
    blocks = sh_blocks(README.read_text())
    assert len([b for b in blocks if b.skip is None]) >= 4
    assert all(b.skip.strip() for b in blocks if b.skip is not None)
    assert any("docker" in b.code for b in blocks if b.skip) and not any("docker" in b.code for b in blocks if not b.skip)
    assert not any("install.sh" in c for b in blocks if not b.skip for c in commands(b))


def test_the_readme_names_no_run_by_a_fixed_id():
    """Issue 14 item 2: `export 1`, `--dataset 1` were wrong after the README's own quick start."""
    fixed = re.compile(r"appliance (export|eval .* --dataset|logs .*--run|run .*--resume) (\d+)\b")
    for block in sh_blocks(README.read_text()):
        for command in commands(block):
            assert not fixed.search(command), f"README.md:{block.line}: {command} names a run by a fixed id"


def _usage_entries(text: str) -> list[tuple[list[str], str]]:
    """(command path, usage) for each command in 'The CLI at a glance': the first line up to its description
    (two spaces or more) and the continuation lines that carry options."""
    block = re.search(r"```\n(appliance \[--db.*?)```", section(text, "The CLI at a glance"), re.S).group(1)
    entries: list[tuple[list[str], str]] = []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        if not line.startswith(" "):
            usage = re.split(r"\s{2,}", line.strip())[0]
            path = []
            for word in usage.split():
                if not re.fullmatch(r"[a-z]+", word):
                    break
                path.append(word)
            entries.append((path, usage))
        elif line.strip().startswith(("[", "-")) and entries:
            path, usage = entries[-1]
            entries[-1] = (path, f"{usage} {line.strip()}")
    return entries


def _options(usage: str) -> list[tuple[str, bool]]:
    """(option, shown as required: outside any brackets) for each -x/--xx in a usage string."""
    out, depth = [], 0
    for token in re.finditer(r"\[|\]|(?<![\w-])(--?[a-z][a-z-]*)", usage):
        if token.group() == "[":
            depth += 1
        elif token.group() == "]":
            depth -= 1
        else:
            out.append((token.group(1), depth == 0))
    return out


def test_the_cli_summary_shows_required_options_as_required_and_only_real_ones():
    """Issue 14 item 7: `-n COUNT` was shown as required (it defaults to 1)."""
    entries = _usage_entries(README.read_text())
    assert len(entries) >= 14
    for path, usage in entries:
        command: click.Command = cli
        for word in path:
            command = command.commands[word]
        params = {opt: p for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
        for option, required in _options(usage):
            assert option in params, f"README: `{usage}`: {' '.join(path)} has no option {option}"
            assert params[option].required == required, (
                f"README: `{usage}`: {option} is {'required' if params[option].required else 'optional'}, "
                f"shown as {'required' if required else 'optional ([...])'}")


def test_the_database_section_names_every_table(tmp_path):
    """Issue 14 item 7: sources, chunks, verdicts, examples, run_events, evals and predictions were missing."""
    store = Store(tmp_path / "fresh.db")
    tables = [r["name"] for r in store.rows("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    tables = [t for t in tables if not t.startswith(("sqlite_", "generations_fts_"))]
    text = section(README.read_text(), "The database")
    missing = [t for t in tables if f"`{t}`" not in text]
    assert not missing, f"README's database section does not name {missing}"


def test_export_writes_the_files_the_readme_names(run_cli, workdir):
    """Issue 14 item 7: the card is NAME.card.md and splits are NAME.SPLIT.jsonl, as the README now says."""
    from test_newcomer import fake_run

    glance = section(README.read_text(), "The CLI at a glance")
    assert "NAME.card.md" in glance and "NAME.SPLIT.jsonl" in glance and "--out NAME.jsonl" in glance
    fake_run(Store(run_cli.db), kind="synthetic", requested=6, name="reviews",
             generations=[{"item_index": i} for i in range(6)], kept=6)
    run_cli("export", "reviews", "--out", "data.jsonl", "--split", "train=0.5,test=0.5")
    written = sorted(p.name for p in workdir.iterdir() if p.name.startswith("data."))
    assert written == ["data.card.md", "data.test.jsonl", "data.train.jsonl"]


# ------------------------------------------------------------------------------------ the README, followed


@pytest.mark.slow
def test_following_the_readme_in_order_runs_every_command(tmp_path):
    folder = tmp_path / "newcomer"
    folder.mkdir()
    for name in ("prompts", "recipes", "tasks"):
        shutil.copytree(REPO / name, folder / name)
    if not os.environ.get("README_TEST_FULL"):
        for rel, changes in SMALLER.items():
            path = folder / rel
            for shipped, small in changes:
                assert shipped in path.read_text(), f"{rel} no longer says {shipped!r}: update SMALLER"
                path.write_text(path.read_text().replace(shipped, small))
    # the installed environment (appliance, sqlite-utils, python) as a whole: `.venv/bin/python` needs the venv's
    # pyvenv.cfg beside bin/ to see its packages
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout's code
    env["HOME"] = os.environ.get("HOME", str(tmp_path))

    ran = 0
    for block in sh_blocks(README.read_text()):
        if block.skip:
            continue
        started = time.perf_counter()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=1800)
        print(f"README.md:{block.line}: {time.perf_counter() - started:.0f} s")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"README.md:{block.line} exited {result.returncode}:\n{block.code}\n---\n{output[-4000:]}"
        assert "Traceback" not in output and "internal error" not in output, f"README.md:{block.line}:\n{output[-4000:]}"
        printed = RUN_PRINTED.findall(output)
        if printed:
            env["RUN_ID"] = printed[-1]
        ran += 1
    assert ran >= 4
    assert (folder / "appliance.db").exists()
    # then the README's Python example, twice, on the same database: a re-run of complete runs is no error
    (folder / "example.py").write_text(re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0])
    for attempt in (1, 2):
        result = subprocess.run([str(folder / ".venv" / "bin" / "python"), "example.py"], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"the Python example, run {attempt}:\n{result.stderr[-4000:]}"
        assert "reviews kept" in result.stdout and "intent accuracy" in result.stdout
    for name in ("reviews.train.jsonl", "reviews.test.jsonl", "reviews.card.md", "smart-home.train.jsonl", "smart-home.test.jsonl",
                 "smart-home.card.md"):  # a task run exports its stored splits
        assert (folder / name).is_file(), f"the README says its commands write {name}"  # a small split may be empty
