"""hetnet's version (the package and its files record it)."""
__version__ = "0.1.0"
