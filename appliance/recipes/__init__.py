"""Recipe runs (synthetic, annotated, augmented): the recipe file, sources, retries, fidelity checks, the run.

May import: runs, data and below; never tasks (a sibling)."""
