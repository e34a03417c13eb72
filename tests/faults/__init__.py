"""Fault-injection scenarios: each one repeated over several trials with fresh state."""
