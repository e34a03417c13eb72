"""Runnable workflow programs: ``fleet run examples/panel.py:main`` and friends."""
