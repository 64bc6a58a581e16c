"""ConfigError, the error of a bad configuration value (here so that config and shellsafe both import it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""
