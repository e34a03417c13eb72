"""fleet's version: a module of its own, so fleet's modules read it without the package."""

__version__ = "0.1.0"
