"""raydora: Ray-native distributionally robust preference alignment of language models."""

__version__ = "0.1.0"
