"""A Celery round of 2,000 no-op steps with tracing off and on, side by side.

The same as ``python -m bench.celery_host --tracing`` (see there); a module of its own so
``bench/run_all`` runs it. Writes bench/results/celery_tracing.json.

    python -m bench.celery_tracing [--workers 2] [--repeat 3] [--quick]
"""

from __future__ import annotations

import sys

from bench.celery_host import main

if __name__ == "__main__":
    sys.argv.insert(1, "--tracing")
    sys.exit(main())
