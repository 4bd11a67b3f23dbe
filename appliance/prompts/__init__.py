"""Prompts: prompt files, chat templates and their sandboxed render worker, JSON Schema constraints.

May import: engine, models."""
