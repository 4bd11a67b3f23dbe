"""Models: the fast GGUF header reader, what it reads (GGUFInfo), and the registry of models by name.

May import: store."""
