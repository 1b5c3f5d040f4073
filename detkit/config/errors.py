"""The config layer's error and its close-match hint."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config problem, phrased for the user: which file, which key, what to do."""


def closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""

