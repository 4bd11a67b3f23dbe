"""Recipe runs (synthetic, annotated, augmented, preference): the recipe file, sources, retries, fidelity checks, preference pairs, the run.

May import: runs, data and below; never tasks (a sibling)."""
