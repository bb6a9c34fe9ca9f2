"""Where agentstream keeps files on disk. Imports nothing of ours (settings, the Kafka
launcher and the CLI all read it).

*State* (broker data and logs, worker tables, the demo's files) goes to the first of:

1. ``AGENTSTREAM_STATE_DIR``, when set;
2. ``<checkout>/var`` when the code runs from a source checkout (the folder holding
   ``pyproject.toml`` next to ``infra/``), so a developer's state stays in the (git-ignored)
   tree they work in;
3. ``$XDG_STATE_HOME/agentstream`` (default ``~/.local/state/agentstream``) for an
   installed copy: never inside ``site-packages``.

*Caches* (the Kafka jars, the Toxiproxy build) go to ``$XDG_CACHE_HOME/agentstream``
(default ``~/.cache/agentstream``).

Every function reads the environment when called, never at import: nothing here creates
a directory, so ``agentstream --help`` leaves the disk as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: the folder holding `infra/` (a checkout's root, or ``site-packages/agentstream``)
PACKAGE_ROOT: Final = Path(__file__).resolve().parents[1]


def source_checkout() -> Path | None:
    """The root of the source checkout this code runs from, or None when installed."""
    marker = PACKAGE_ROOT / "pyproject.toml"
    return PACKAGE_ROOT if marker.is_file() else None


def _xdg(variable: str, default: str) -> Path:
    base = os.environ.get(variable, "").strip()
    # the XDG spec: a relative path is invalid and must be ignored
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / default
    return root / "agentstream"


def state_home() -> Path:
    """The state folder (see the module docstring); not created here."""
    explicit = os.environ.get("AGENTSTREAM_STATE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    checkout = source_checkout()
    if checkout is not None:
        return checkout / "var"
    return _xdg("XDG_STATE_HOME", ".local/state")


def cache_home() -> Path:
    """The cache folder: ``$XDG_CACHE_HOME/agentstream``; not created here."""
    return _xdg("XDG_CACHE_HOME", ".cache")
