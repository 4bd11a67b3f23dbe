"""Workers: one model on one machine (in-process), or one per Ray actor across a cluster.

May import: engine, plan, models."""
