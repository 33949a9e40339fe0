"""`python -m tileattn`, the first thing a new user runs."""

import subprocess
import sys

import tileattn


def test_main_prints_config_and_benchmark_table():
    r = subprocess.run([sys.executable, "-m", "tileattn", "--rounds", "1", "--threads", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"tileattn {tileattn.__version__}" in out
    assert "ISA path in use" in out and "threads         : 2" in out
    rows = [line for line in out.splitlines() if line.startswith(("8,12,128", "1,16,1024"))]
    assert len(rows) == 3
    assert all("GFLOP" not in row and row.count("ms") >= 2 for row in rows)


def test_show_config(capsys):
    tileattn.show_config()
    out = capsys.readouterr().out
    assert tileattn.__version__ in out and tileattn.config()["isa_path_in_use"] in out


def test_bench_quick_runs():
    r = subprocess.run([sys.executable, "-m", "tileattn", "bench", "--quick", "--threads", "1",
                        "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tileattn bench: 5 shapes, 1 threads" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line[:1].isdigit()]
    assert len(rows) == 5 and all(" ms " in row for row in rows)


def test_plain_progress_bar(capsys):
    from tileattn._progress import _plain

    assert list(_plain([1, 2, 3], "x")) == [1, 2, 3]
    err = capsys.readouterr().err
    assert "3/3" in err and "[" in err
