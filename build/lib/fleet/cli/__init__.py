"""The ``fleet`` command line. Each module registers its commands on :data:`app`."""

from . import asks as asks  # fleet answer, fleet asks
from . import budget as budget  # fleet budget show|set
from . import cancel as cancel  # fleet cancel
from . import dashboard as dashboard  # fleet dashboard
from . import demo as demo  # fleet demo
from . import fleetops as fleetops  # fleet worker, fleet flower, fleet up
from . import gc as gc  # fleet gc
from . import journal as journal  # fleet journal list|show|rm
from . import limits as limits  # fleet limits show
from . import run as run  # fleet run, fleet watch, fleet status
from .app import app as app
from .app import main as main

__all__ = ["app", "main"]
