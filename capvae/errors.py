"""Errors raised for bad input, before anything is compiled or written."""


class ConfigError(ValueError):
  """A config value, or the data it names, is out of range, unknown or malformed."""
