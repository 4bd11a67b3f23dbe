"""Task runs for small models: the task spec, teacher and student prompts, the run, the student's evaluation.

May import: runs, data and below; never recipes (a sibling)."""
