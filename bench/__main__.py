"""Run all benchmarks, or the named ones: ``python -m bench [--snapshot] [NAME ...]``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import NAMES

# Paths only: importing bench.common would load the whole app into this launcher.
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

DEFAULT = ("overhead", "throughput", "retrieval", "streaming", "startup", "floor")
USAGE = f"""usage: python -m bench [--snapshot] [NAME ...] [-- ARGS for each NAME]

NAME: {", ".join(NAMES)} (default: {", ".join(DEFAULT)}; experiments only when named).
Each runs as `python -m bench.NAME` (see its --help), prints its tables and writes
bench/results/NAME.json.
--snapshot  run against the committed code (git archive HEAD in a temporary directory, with
            this bench/ copied in) instead of the working tree, which others may be editing;
            the results are copied back to bench/results/.
"""


def snapshot() -> Path:
    """HEAD's files in a temporary directory, plus the current bench/ (read-only use of git)."""
    target = Path(tempfile.mkdtemp(prefix="desktop-bench-snapshot-"))
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    shutil.rmtree(target / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", target / "bench",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"snapshot of HEAD {commit} in {target}", flush=True)
    return target


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    use_snapshot = "--snapshot" in argv
    names = [a for a in argv if not a.startswith("-")] or list(DEFAULT)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}\n\n{USAGE}")
        return 2
    root = snapshot() if use_snapshot else ROOT
    env = dict(os.environ)
    if use_snapshot:  # the snapshot has no .git: tell the results which commit they measured
        env["DESKTOP_BENCH_COMMIT"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip() + " (snapshot)"
    failed: list[str] = []
    try:
        for name in names:
            print(f"\n===== bench.{name} =====", flush=True)
            began = time.monotonic()
            # One interpreter per script: start-up and import timings must not see warm
            # modules, and each script installs its own process-wide cipher.
            code = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra], cwd=root,
                                   env=env)
            print(f"===== bench.{name}: exit {code} in {time.monotonic() - began:.0f} s =====",
                  flush=True)
            if code != 0:
                failed.append(name)
    finally:
        if use_snapshot:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            for path in (root / "bench" / "results").glob("*"):
                shutil.copy2(path, RESULTS_DIR / path.name)
            shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
