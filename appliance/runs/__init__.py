"""Runs: items and their index layout, how prompts reach the model, the run session, queries over runs,
run summaries, and the generate run.

May import: workers, prompts, data, store and below."""
