"""appliance: turn local GGUF models into training datasets, fully offline, logged in SQLite."""

__version__ = "0.1.0"
