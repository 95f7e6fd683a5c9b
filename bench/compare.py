"""Two git revisions, one benchmark, measured back to back in one sitting.

    python -m bench compare REV_A REV_B [--rounds N] -- NAME [ARGS ...]
    (the same as python -m bench.compare REV_A REV_B [--rounds N] -- NAME [ARGS ...])

This machine's speed drifts by up to 2x within an hour, so only runs made back to back
compare. Each revision gets a detached git worktree in a temporary directory, sharing this
checkout's .venv, with this checkout's bench/ copied over the revision's own: the same
benchmark code measures both. `python -m bench.NAME ARGS` then runs in them alternately
(A, B, A, B ... for N rounds). The table shows each key figure's median over the rounds for A
and B, and B's change against A; bench/results/compare-NAME.json keeps every run's figures.
The worktrees are removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import NAMES

# Paths only, as in bench/__main__.py: this driver never imports the app.
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MISSING = "—"

Figures = dict[str, float | None]


# ------------------------------------------------------------ key figures, per benchmark
# Each reads the JSON its benchmark writes (the write_result call at the end of bench/NAME.py)
# and returns {label: value}; a figure the run did not produce is None.


def dig(data: Any, *keys: str | int) -> float | None:
    """data[k1][k2]... as a float, or None when a key is missing or the value is NaN."""
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(data, bool) or not isinstance(data, int | float) or math.isnan(data):
        return None
    return float(data)


def overhead_figures(data: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in data.get("results", []):
        config = f"{r.get('db')}, memory {'on' if r.get('memory') else 'off'}"
        out[f"{config}: end to end p50 (ms)"] = dig(r, "e2e_ms", "p50")
        out[f"{config}: end to end p99 (ms)"] = dig(r, "e2e_ms", "p99")
    return out


def throughput_figures(data: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in data.get("results", []):
        db, slow = r.get("db"), r.get("slow", [])
        out[f"{db}: burst (msg/s)"] = dig(r, "burst", "per_s")
        out[f"{db}: burst, bot CPU per message (ms)"] = dig(r, "burst", "bot_cpu_ms_per_message")
        thousand = [s for s in slow if s.get("users") == 1000]
        out[f"{db}: 1,000 users in flight, peak RSS (MB)"] = (
            dig(thousand[0], "peak_rss_mb") if thousand else None)
        for s in slow:
            out[f"{db}: {s.get('users')} users, 1 s model, all answered (s)"] = dig(
                s, "all_answered_s")
    return out


def retrieval_figures(data: dict[str, Any]) -> Figures:
    return {f"{r.get('db')}, {r.get('memories')} x {r.get('dims')} dims: warm p50 (ms)":
            dig(r, "warm_ms", "p50") for r in data.get("results", [])}


def streaming_figures(data: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in data.get("results", []):
        scenario = str(r.get("scenario"))
        if scenario.endswith("zero-latency model"):
            continue  # no first token to time against: not part of the target
        out[f"{scenario}: first visible p50 (ms)"] = dig(r, "first_visible_ms", "p50")
        out[f"{scenario}: first visible p99 (ms)"] = dig(r, "first_visible_ms", "p99")
    return out


def startup_figures(data: dict[str, Any]) -> Figures:
    out: Figures = {}
    for kind, runs in data.get("runs", {}).items():
        for start in ("fresh", "restart"):
            ready = [v for run in runs.get(start, []) if (v := dig(run, "ready_s")) is not None]
            out[f"{kind}, {start}: start-up to ready (s)"] = (
                statistics.median(ready) if ready else None)
    return out


def agents_figures(data: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in data.get("results", []):
        out[f"{r.get('scenario')}: wall p50 (ms)"] = dig(r, "wall_ms_p50")
        out[f"{r.get('scenario')}: tokens charged"] = dig(r, "tokens")
    return out


def memory_figures(data: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in data.get("results", []):
        for metric in ("any@3", "all@3", "any@5"):
            out[f"{r.get('design')}: {metric}"] = dig(r, metric)
        out[f"{r.get('design')}: tokens added, max"] = dig(r, "tokens", "max")
    out["10,000 units: search p50 (ms)"] = dig(data, "scale", "warm_ms", "p50")
    return out


def lean_figures(data: dict[str, Any]) -> Figures:
    names = {
        "reaction_ms": "first reaction, private, p50 (ms)",
        "reaction_group_ms": "first reaction, group, p50 (ms)",
        "fresh_s": "start-up to first getUpdates, fresh (s)",
        "warm_s": "start-up to first getUpdates, warm (s)",
        "rss200_mb": "peak RSS, 200 users at once (MB)",
        "answers_per_s_200": "answers per second, 200 users at once",
        "rss1000_mb": "peak RSS, 1,000 users in flight (MB)",
    }
    return {label: dig(data, "figures", key) for key, label in names.items()}


FIGURES: dict[str, Callable[[dict[str, Any]], Figures]] = {
    "overhead": overhead_figures, "throughput": throughput_figures,
    "retrieval": retrieval_figures, "streaming": streaming_figures, "startup": startup_figures,
    "agents": agents_figures, "memory": memory_figures, "lean": lean_figures,
}
assert set(FIGURES) == set(NAMES), "every benchmark needs its key figures here"


def figures(name: str, data: dict[str, Any]) -> Figures:
    # The calibration says how fast the machine was during the run (lower is faster): a big
    # gap between A and B means the drift, not the code, may explain a difference.
    return {"machine calibration (ms, lower = faster)": dig(data, "machine", "calibration_ms"),
            **FIGURES[name](data)}


# ---------------------------------------------------------------------- the two sides


@dataclass
class Side:
    letter: str
    revision: str
    commit: str
    tree: Path
    runs: list[Figures] = field(default_factory=list)

    def median(self) -> Figures:
        labels = dict.fromkeys(label for run in self.runs for label in run)
        out: Figures = {}
        for label in labels:
            values = [v for run in self.runs if (v := run.get(label)) is not None]
            out[label] = statistics.median(values) if values else None
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "commit": self.commit, "runs": self.runs,
                "median": self.median()}


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed:\n{done.stderr.strip()}")
    return done.stdout.strip()


def resolve(revision: str) -> str:
    return git("rev-parse", "--verify", f"{revision}^{{commit}}")


def prepare(tree: Path) -> None:
    """The shared virtualenv, and this checkout's bench/ (no results, no caches) over the tree's."""
    venv = ROOT / ".venv"
    if venv.exists():
        (tree / ".venv").symlink_to(venv.resolve())
    shutil.rmtree(tree / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", tree / "bench",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))


@contextlib.contextmanager
def worktrees(commits: Sequence[str]) -> Iterator[list[Path]]:
    """A detached worktree per commit in a temporary directory, removed afterwards in any case."""
    base = Path(tempfile.mkdtemp(prefix="desktop-bench-compare-"))
    made: list[Path] = []
    try:
        for letter, commit in zip("ab", commits, strict=True):
            tree = base / letter
            git("worktree", "add", "--detach", str(tree), commit)
            made.append(tree)
            prepare(tree)
        yield made
    finally:
        for tree in made:
            removed = subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
            if removed.returncode != 0:
                print(f"could not remove the worktree {tree}; `git worktree prune` will, once "
                      f"the directory is gone", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


def run_once(side: Side, name: str, args: list[str]) -> Figures:
    """One run of bench.NAME in the side's worktree; its key figures ({} if it failed)."""
    result = side.tree / "bench" / "results" / f"{name}.json"
    result.unlink(missing_ok=True)  # a failed run must not report the previous round's file
    venv_python = side.tree / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    # The worktree's own modules: cwd is first on sys.path with -m, and nothing else may be.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = subprocess.call([python, "-m", f"bench.{name}", *args], cwd=side.tree, env=env)
    if not result.exists():
        print(f"run on {side.letter.upper()} ({side.revision}) exited {code} without a result",
              flush=True)
        return {}
    return figures(name, json.loads(result.read_text()))


# ---------------------------------------------------------------------------- output


def number(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"


def change(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return MISSING
    return f"{(b / a - 1) * 100:+.1f} %"


def report(name: str, a: Side, b: Side, rounds: int) -> str:
    a_median, b_median = a.median(), b.median()
    labels = list(dict.fromkeys([*a_median, *b_median]))
    headers = [f"bench.{name} (median of {rounds})", f"A {a.revision} ({a.commit[:8]})",
               f"B {b.revision} ({b.commit[:8]})", "B/A"]
    rows = [[label, number(a_median.get(label)), number(b_median.get(label)),
             change(a_median.get(label), b_median.get(label))] for label in labels]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        # The label column reads left to right; the figures line up on their last digit.
        return "  ".join([row[0].ljust(widths[0])]
                         + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)])

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def write(name: str, args: list[str], rounds: int, a: Side, b: Side) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"compare-{name}.json"
    payload = {"bench": f"compare-{name}", "name": name, "args": args, "rounds": rounds,
               "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "a": a.as_dict(), "b": b.as_dict()}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------ main


def parse(argv: list[str]) -> tuple[argparse.Namespace, str, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench compare",
        usage="%(prog)s REV_A REV_B [--rounds N] -- NAME [ARGS ...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a", metavar="REV_A", help="the baseline: a commit, branch or tag")
    parser.add_argument("rev_b", metavar="REV_B", help="the revision compared with it")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="runs per revision, alternating A, B, A, B ... (default 1)")
    head, bench = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    args = parser.parse_args(head)
    if not bench or bench[0] not in NAMES:
        parser.error(f"after --, name one benchmark: {', '.join(NAMES)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args, bench[0], bench[1:]


def main(argv: list[str]) -> int:
    args, name, bench_args = parse(argv)
    commits = [resolve(args.rev_a), resolve(args.rev_b)]
    with worktrees(commits) as trees:
        a = Side("a", args.rev_a, commits[0], trees[0])
        b = Side("b", args.rev_b, commits[1], trees[1])
        for round_no in range(1, args.rounds + 1):
            for side in (a, b):
                print(f"\n===== round {round_no}/{args.rounds}: {side.letter.upper()} = "
                      f"{side.revision}, bench.{name} {' '.join(bench_args)} =====", flush=True)
                side.runs.append(run_once(side, name, bench_args))
    print(f"\n{report(name, a, b, args.rounds)}")
    print(f"\nwritten: {write(name, bench_args, args.rounds, a, b)}")
    # A run without a result shows as "—"; the exit status says that one was missing.
    return 0 if all(a.runs + b.runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
