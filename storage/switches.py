"""On/off settings from the environment, read one way everywhere (a light module: ``ccrk`` reads
one before anything heavy is imported)."""
from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` turns something off (``0``/``false``/``no``/``off``,
    any case); unset or anything else leaves it on."""
    return os.environ.get(name, "").strip().lower() in OFF
