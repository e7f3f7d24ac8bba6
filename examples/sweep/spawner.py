"""Grows the workflow at run time: spawns one child per value it decides to explore."""

import os

from balsam_core import api

me = api.current_task()
for i in range(5):
    api.spawn_child(
        app="simulate", parameters={"x": 10 + i}, name=f"spawned{i}",
        node_packing_count=os.cpu_count() or 1, tags={"group": "spawned"},
    )
print(f"task {me.id} spawned 5 children")
