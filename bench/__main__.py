"""Run all benchmarks, or the named ones: ``python -m bench [NAME ...] [-- ARGS]``.

``python -m bench compare REV_A REV_B [--rounds N] -- NAME [ARGS...]`` hands over to
bench/compare.py (two git revisions measured back to back).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import NAMES

# Paths only: importing bench.common would load the whole app into this launcher.
ROOT = Path(__file__).resolve().parent.parent

DEFAULT = NAMES
USAGE = f"""usage: python -m bench [NAME ...] [-- ARGS for each NAME]
       python -m bench compare REV_A REV_B [--rounds N] -- NAME [ARGS ...]

NAME: {", ".join(NAMES)} (default: all of them).
Each runs as `python -m bench.NAME` (see its --help), prints its tables and writes
bench/results/NAME.json.
compare: run one benchmark on two git revisions, alternately, and print both sides' key
         figures with the change (see `python -m bench.compare --help`).
"""


def run_all(names: list[str], extra: list[str]) -> int:
    failed: list[str] = []
    for name in names:
        print(f"\n===== bench.{name} =====", flush=True)
        began = time.monotonic()
        # One interpreter per script: start-up and import timings must not see warm
        # modules, and each script installs its own process-wide cipher.
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra], cwd=ROOT)
        print(f"===== bench.{name}: exit {code} in {time.monotonic() - began:.0f} s =====",
              flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        from bench import compare

        return compare.main(argv[1:])
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    names = [a for a in argv if not a.startswith("-")] or list(DEFAULT)
    unknown = [n for n in names if n not in NAMES] + [a for a in argv if a.startswith("-")]
    if unknown:
        print(f"unknown benchmark(s) or option(s): {', '.join(unknown)}\n\n{USAGE}")
        return 2
    return run_all(names, extra)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
