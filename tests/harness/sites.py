"""Small helpers for tests and benchmarks that drive a site: waiting on a condition,
and setting keys in its ``balsam.toml``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> object:
    """*predicate*'s first truthy value, polled every 50 ms; its last value after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def set_config(site_dir: Path, **settings: object) -> None:
    """Replace ``key = ...`` lines of the site's balsam.toml (each key must occur once)."""
    toml = site_dir / "balsam.toml"
    text = toml.read_text()
    for key, value in settings.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert count == 1, key
    toml.write_text(text)
