"""Example workflow: a parameter sweep with fan-out and fan-in, built with the Python API.

    python examples/dag_workflow.py SITE_DIR

Creates 1 setup task -> 48 simulations (fan-out) -> 4 group reductions -> 1 report
(fan-in): a DAG of 54 tasks, all unmodified programs, in workflow "sweep".
"""

from __future__ import annotations

import sys

from balsam_core.api import Site


def build(site: Site) -> dict[str, list[int]]:
    """Add the apps (if missing) and the workflow's tasks; return the ids by stage."""
    existing = {a.name for a in site.apps()}
    apps = {
        "setup": "python3 -c 'import os; os.makedirs(\"inputs\", exist_ok=True)'",
        "simulate": "python3 -c 'import sys, math; print(math.sin(float(sys.argv[1])))' {x}",
        "reduce": "python3 -c 'import sys; print(\"group\", sys.argv[1])' {group}",
        "report": "python3 -c 'print(\"sweep done\")'",
    }
    for name, command in apps.items():
        if name not in existing:
            site.add_app(name, command, description=f"sweep example: {name}")
    (setup,) = site.add_tasks([{"app": "setup", "workflow": "sweep", "name": "setup"}])
    sims = site.add_tasks(
        {
            "app": "simulate",
            "workflow": "sweep",
            "name": f"sim{i:02d}",
            "parameters": {"x": i / 10},
            "parents": [setup],
            "tags": {"group": str(i % 4)},
            "wall_time_min": 1,
            "node_packing_count": 8,
        }
        for i in range(48)
    )
    reductions = site.add_tasks(
        {
            "app": "reduce",
            "workflow": "sweep",
            "name": f"reduce{g}",
            "parameters": {"group": g},
            "parents": [s for i, s in enumerate(sims) if i % 4 == g],
        }
        for g in range(4)
    )
    (report,) = site.add_tasks(
        [{"app": "report", "workflow": "sweep", "name": "report", "parents": reductions}]
    )
    return {"setup": [setup], "simulate": sims, "reduce": reductions, "report": [report]}


if __name__ == "__main__":
    site = Site.open(sys.argv[1] if len(sys.argv) > 1 else None)
    stages = build(site)
    total = sum(len(ids) for ids in stages.values())
    print(f"Added workflow 'sweep': {total} tasks " + ", ".join(f"{k}={len(v)}" for k, v in stages.items()))
