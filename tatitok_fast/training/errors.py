"""Errors a user can fix, raised by the engine's config and recipe lookups (own module so that
config.py and spec.py need not import each other)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the dotted key."""
