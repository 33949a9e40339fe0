"""The child's command line: ``python -m fuzz TARGET EXAMPLES CASE_FILE [SEED]``
(run from tests/); see the package docstring."""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hyp_seed

from .harness import open_case_log
from .targets import TARGETS


def main(argv) -> int:
    name, examples, case_file = argv[1], int(argv[2]), argv[3]
    run_seed = int(argv[4]) if len(argv) > 4 else int.from_bytes(os.urandom(4), "little")
    log = open_case_log(case_file)
    fn, strategy = TARGETS[name]
    print(f"fuzz {name}: seed {run_seed}, {examples} examples", flush=True)

    @hyp_seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def run(case):
        fn(case)

    run()
    print(f"fuzz {name}: {log.count} cases passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
