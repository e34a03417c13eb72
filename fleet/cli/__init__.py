"""The ``fleet`` command line. Each module registers its commands on :data:`app`."""

from . import demo as demo  # fleet demo
from .app import app as app
from .app import main as main

__all__ = ["app", "main"]
