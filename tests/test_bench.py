"""The benchmarks' own wiring: `python -m bench compare` can read every benchmark it can run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compare_knows_the_key_figures_of_every_benchmark() -> None:
    from bench import NAMES
    from bench.compare import FIGURES

    assert set(FIGURES) == set(NAMES)


def test_every_benchmark_answers_help() -> None:
    from bench import NAMES

    for name in NAMES:
        done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout, (name, done.stderr[-500:])
