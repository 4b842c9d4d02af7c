"""mongoproxy: a streaming MongoDB wire-protocol proxy."""

__version__ = "0.1.0"
