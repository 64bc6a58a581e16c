"""ConfigError, the error of a bad configuration value (here so that config and shellsafe both import it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class InputTooLargeError(ValueError):
    """A CSV or JSON file larger than any bonehpc reads (bonehpc.fsio.read_bytes_bounded); names the file."""
