"""Example workflow: a parameter sweep with fan-out and fan-in, built with the Python API.

    python examples/dag_workflow.py [SITE_DIR]

Adds to workflow "sweep": setup -> 48 simulations (fan-out) -> 4 group reductions
(fan-in, each staging in its parents' result.json) -> 1 report, plus one task that
fails and is repaired by its error handler, one that times out and is retried, and
one that spawns 5 children at run time: 58 tasks to start with, all plain programs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from balsam_core.api import Site

HERE = Path(__file__).resolve().parent / "sweep"
PY = sys.executable  # the programs that use the API need this environment's Python


def _apps(site: Site) -> None:
    existing = {a.name for a in site.apps()}
    apps = {
        "setup": ([PY, "-c", "print('inputs ready')"], None),
        "simulate": ([PY, str(HERE / "sim.py"), "{x}"], None),
        "flaky": ([PY, str(HERE / "flaky.py")], [PY, str(HERE / "fix.py")]),
        "slow": ([PY, str(HERE / "slow.py")], None),
        "spawner": ([PY, str(HERE / "spawner.py")], None),
        "reduce": ([PY, str(HERE / "reduce.py"), "{group}"], None),
        "report": ([PY, "-c", "print('sweep done')"], None),
    }
    for name, (command, post) in apps.items():
        if name not in existing:
            site.add_app(name, command, postprocess=post, description=f"sweep example: {name}")


def build(site: Site) -> dict[str, list[int]]:
    """Add the apps (if missing) and the workflow's tasks; return the ids by stage."""
    _apps(site)
    # Serial tasks share a node, one per CPU of this machine.
    shared = {"workflow": "sweep", "node_packing_count": os.cpu_count() or 1}
    (setup,) = site.add_tasks([{"app": "setup", "name": "setup", **shared}])
    sims = site.add_tasks(
        {
            "app": "simulate", "name": f"sim{i:02d}", "parameters": {"x": i / 10},
            "parents": [setup], "tags": {"group": str(i % 4)}, "wall_time_min": 1, **shared,
        }
        for i in range(48)
    )
    odd = site.add_tasks(
        [
            {"app": "flaky", "name": "flaky", "parents": [setup], "post_error_handler": True,
             "tags": {"group": "0"}, **shared},
            {"app": "slow", "name": "slow", "parents": [setup], "wall_time_min": 0.05,
             "auto_timeout_retry": True, "tags": {"group": "1"}, **shared},
            {"app": "spawner", "name": "spawner", "parents": [setup], **shared},
        ]
    )
    members = {g: [t for i, t in enumerate(sims) if i % 4 == g] for g in range(4)}
    members[0].append(odd[0])  # the repaired task's result counts in group 0
    members[1].append(odd[1])  # the retried one's in group 1
    reductions = site.add_tasks(
        {
            "app": "reduce", "name": f"reduce{g}", "parameters": {"group": g},
            "parents": members[g],
            "input_files": ["result.json"], **shared,
        }
        for g in range(4)
    )
    (report,) = site.add_tasks(
        [{"app": "report", "name": "report", "parents": reductions, **shared}]
    )
    return {"setup": [setup], "simulate": sims, "special": odd, "reduce": reductions,
            "report": [report]}


if __name__ == "__main__":
    site = Site.open(sys.argv[1] if len(sys.argv) > 1 else None)
    stages = build(site)
    total = sum(len(ids) for ids in stages.values())
    summary = ", ".join(f"{k}={len(v)}" for k, v in stages.items())
    print(f"Added workflow 'sweep': {total} tasks ({summary})")
