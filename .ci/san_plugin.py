"""pytest plugin for .ci/sanitize.sh: every test on every ISA path, once.

The script runs the suite once per ISA path (TILEATTN_ISA). Tests that take
the ``each_isa`` fixture already loop over every path, so they are run in
the first pass only (TILEATTN_SAN_FIRST_PASS=1) and deselected in the others.
"""

import os


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TILEATTN_SAN_FIRST_PASS", "1") == "1":
        return
    keep, drop = [], []
    for item in items:
        (drop if "each_isa" in getattr(item, "fixturenames", ()) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
