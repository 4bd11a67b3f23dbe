"""The engine: llama.cpp bindings, output grammars, sampling, and many sequences advanced per decode call.

May import: plan, models."""
