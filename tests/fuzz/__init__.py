"""Fuzz targets for tests/test_fuzz.py, each run in a child process.

    cd tests && python -m fuzz TARGET EXAMPLES CASE_FILE [SEED]

Hypothesis draws EXAMPLES cases of bad and odd input for one public entry
point. Every case must either give the right answer (checked against the
float64 oracle in reference.py or an independent NumPy formula) or raise one
of tileattn's typed errors (ShapeError, DTypeError, InvalidParameterError, or
MemoryError where the case asks for an impossible allocation) whose message
names the argument at fault. Anything else fails the case: another exception
type, a wrong or non-finite answer where a finite one is due, modified inputs.

Before each case its description is written to CASE_FILE, so that when the
process dies (segfault, abort, sanitizer report) or hangs, the parent can say
which case did it. On success the last line printed is
``fuzz TARGET: N cases passed``.

Layout: harness.py (case log, outcome rules, layouts, shared oracles), one
target_*.py per entry point (its case strategy and its checks), selftest.py
(the harness's own crash and untyped-error targets), targets.py (the table
of names), __main__.py (the child's command line). The modules import
reference.py from tests/, which is on sys.path when the child runs from there.

Hypothesis mixes literals from the source of loaded local modules into its
draws, but skips files under a directory named tests: that is why these
modules' own numbers do not steer the fixed-seed cases, and why moving the
package out of tests/ would change every case the fixed seed draws.
"""
