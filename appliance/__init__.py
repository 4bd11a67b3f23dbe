"""appliance: turn local GGUF models into training datasets, fully offline, logged in SQLite.

`from appliance import Appliance` is the Python API (see `appliance.api`); the `appliance` command
is the same library behind a CLI.
"""

from typing import TYPE_CHECKING, Any

from .version import VERSION as __version__
__all__ = ["Appliance", "__version__"]

if TYPE_CHECKING:
    from .api import Appliance


def __getattr__(name: str) -> Any:
    # Imported on first use: `import appliance` (the CLI's start, `--help`) stays fast.
    if name == "Appliance":
        from .api import Appliance

        return Appliance
    raise AttributeError(f"module 'appliance' has no attribute {name!r}")
