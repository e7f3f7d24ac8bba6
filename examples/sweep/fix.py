"""Postprocess and error handler: after an error, write a default result and declare
the task finished through the API; after a normal run, do nothing."""

import json
import os

from balsam_core import api

if os.environ.get("BALSAM_TASK_ERROR") == "1":
    json.dump({"x": None, "y": 0.0, "repaired": True}, open("result.json", "w"))
    api.current_site().set_state(api.current_task_id(), "JOB_FINISHED", "repaired by fix.py")
