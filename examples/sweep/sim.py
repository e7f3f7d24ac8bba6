"""A toy simulation: computes sin(x) and writes it to result.json."""

import json
import math
import sys
import time

x = float(sys.argv[1])
time.sleep(0.2)
json.dump({"x": x, "y": math.sin(x)}, open("result.json", "w"))
print(f"sin({x}) = {math.sin(x):.4f}")
