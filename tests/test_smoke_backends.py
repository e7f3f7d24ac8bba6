"""Both backends open, write and read (the fixtures' own check)."""

from balsam_core.api import Site


def test_site_roundtrip(site: Site) -> None:
    site.add_app("echo", "echo {x}")
    ids = site.add_tasks([{"app": "echo", "parameters": {"x": i}} for i in range(10)])
    assert site.count() == {"READY": 10}
    assert [t.id for t in site.tasks(limit=3)] == ids[:3]
