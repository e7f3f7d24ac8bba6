"""Fails on purpose (exit 2); its app's error handler (fix.py) repairs the run."""

import sys

print("the input deck is missing a parameter", file=sys.stderr)
sys.exit(2)
