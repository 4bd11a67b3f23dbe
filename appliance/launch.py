"""`appliance run FILE`: which runner a file goes to (a recipe or a task spec), in this process or on a
Ray cluster's actors. The one place that knows both run kinds; they do not know each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models.registry import Registry
from .recipes.recipe import load_recipe
from .recipes.run import run_recipe
from .runs.files import is_task_spec
from .runs.summary import RunSummary
from .store import Store
from .tasks.run import run_task_spec
from .tasks.spec import load_task_spec


def run_file(store: Store, registry: Registry, file: str | Path, *, ray: str | None = None, ray_actors: int | None = None,
             **options: Any) -> RunSummary:
    """A recipe or a task spec, in this process or (`ray`: local, auto, HOST:PORT or ray://HOST:PORT) on a
    Ray cluster's actors; `options` are run_recipe's / run_task_spec's."""
    loaded: Any
    if is_task_spec(file):
        loaded, runner = load_task_spec(file), run_task_spec
    else:
        loaded, runner = load_recipe(file), run_recipe
    if ray is None:
        return runner(store, registry, loaded, **options)
    from .workers.cluster import Cluster  # Ray is imported only for --ray

    with Cluster(ray, actors=ray_actors) as cluster:
        return runner(store, registry, loaded, cluster=cluster, **options)
