"""Fitting the machine: hardware measured, the memory estimate from a GGUF header, and the plan chosen from it.

May import: models."""
