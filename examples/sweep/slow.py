"""Too slow on its first attempt (times out), quick when retried."""

import json
import os
import time

if not os.path.exists("attempted"):
    open("attempted", "w").close()
    time.sleep(30)  # past the task's wall time: the launcher ends it, then it is retried
json.dump({"x": None, "y": 0.5}, open("result.json", "w"))
print("done on retry")
