"""Test harness helpers that drive real external components (PostgreSQL, ...)."""
