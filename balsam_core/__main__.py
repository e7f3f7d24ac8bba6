"""``python -m balsam_core``: the ``balsam`` command (batch jobs start the launcher so,
with the interpreter that submitted them, whatever ``PATH`` holds on the nodes)."""

from .cli import main

main()
