"""``${VAR}`` and ``${VAR:-default}`` in the paths of a data recipe (sources, benchmarks, outputs).

Below both :mod:`moeforge.data.recipe` and the stage configs it holds (such as
:class:`moeforge.data.decontam.DecontamConfig`), so each can expand its own paths as it validates them.
"""

from __future__ import annotations

import os
import re

from moeforge.config import ConfigError

__all__ = ["expand_vars"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without a default is an error."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:  # like the shell's ${VAR:-default}: unset or empty takes the default
            return default
        state = "is empty" if value == "" else "is not set"
        raise ConfigError(f"{text!r}: environment variable {name} {state} and has no ${{{name}:-default}}")

    return _VAR.sub(repl, text)
