"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ApplianceError(Exception):
    """A problem the user can fix; its message is one line, shown as `Error: <message>`."""

    exit_code = 1


class ModelFileError(ApplianceError):
    """A model file that is missing, unreadable, not GGUF, or truncated."""


class PlanError(ApplianceError):
    """The model does not fit this machine with the requested settings."""


class StoreError(ApplianceError):
    """The database cannot be opened or written."""


class PromptError(ApplianceError):
    """A prompt file that cannot be parsed or rendered."""


class GenerationError(ApplianceError):
    """llama.cpp failed while loading or decoding."""


class ResumeError(ApplianceError):
    """A run cannot be continued as asked (its recipe, prompt, mode or chat template changed)."""
