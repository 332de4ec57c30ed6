"""Exception and warning types for configuration mistakes (no heavy imports)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake the user can fix. The message is one sentence naming the key and what to do."""


class ConfigWarning(UserWarning):
    """A legal but probably unintended setting (for example a batch size that is not a multiple of 16)."""
