"""Where the package finds its own data and keeps what it builds, installed or run from a checkout.

Prices, personas and prompts ship inside the package. What the package builds once per machine (the
converted embedded model, test-set embeddings) goes in a user cache folder, not beside the source:
$PERSONAMATH_CACHE, else $XDG_CACHE_HOME/personamath, else ~/.cache/personamath.
"""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RESOURCES = PACKAGE_DIR / "resources"
CACHE_ENV_VAR = "PERSONAMATH_CACHE"


def user_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "personamath"
