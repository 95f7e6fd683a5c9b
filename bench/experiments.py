"""Price each proposed fix: the overhead run (SQLite, sequential) with one bench patch at a time."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from bench.common import set_chunking, table, write_result
from bench.overhead import run_config
from bench.patches import PATCHES

# Patches that are tools, not experiments: they slow the bot down to look inside it.
TOOLS = {"tracemalloc_peak"}

EXPLAIN = """\
What is measured
  bench.overhead's sequential run (SQLite, memory off, a different user per message, bot in its
  own process), once per experiment, each with a fresh bot and database. An experiment is a set
  of monkeypatches from bench/patches.py applied inside the bot process before it starts (the
  code on disk is not changed). A patch either prices a proposal, or restores what the code did
  before a change shipped (so the change's worth can be re-measured on any day), or takes a part
  away to price it ("not a proposal" in its description).
  CPU/msg (the bot process's CPU time over the measured phase / messages) is the steadiest
  figure on a shared machine; the latencies move with whatever else runs ("other load").
"""


@dataclass(frozen=True)
class Experiment:
    name: str
    patches: str
    history: int = 0
    chunk_words: int = 1  # 0: the whole answer in one chunk


def experiments() -> list[Experiment]:
    out = [Experiment("baseline (as shipped)", "")]
    out += [Experiment(f"+{name}", name) for name in PATCHES if name not in TOOLS]
    out += [
        Experiment("answer in 1 chunk instead of ~64", "", chunk_words=0),
        Experiment("history: 40 messages in the session", "", history=40),
        Experiment("baseline again (drift check)", ""),
    ]
    return out


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("--users", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated substrings of names to run")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--name", default="experiments", help="results file name")
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    chosen = [e for e in experiments() if not wanted or any(w in e.name for w in wanted)]
    rows: list[dict[str, Any]] = []
    for experiment in chosen:
        print(f"running: {experiment.name} [{experiment.patches or 'no patches'}]", flush=True)
        set_chunking(experiment.chunk_words or None)
        result = await run_config(args.db, False, args.users, args.rounds, 0.005,
                                  experiment.patches, history=experiment.history)
        rows.append({"experiment": experiment.name, "patches": experiment.patches,
                     "history": experiment.history, "chunk_words": experiment.chunk_words,
                     **result})
        print(f"  e2e p50 {result['e2e_ms']['p50']:.1f} ms, CPU "
              f"{result['bot_cpu_ms_per_message']:.1f} ms/msg, other load "
              f"{result['phase']['others_cores']:.2f}", flush=True)
        # Written after every experiment: a long series interrupted keeps what it measured.
        write_result(args.name, {"explain": EXPLAIN, "results": rows,
                                 "patches": {k: v[0] for k, v in PATCHES.items()}})
    print(EXPLAIN)
    base = next((r for r in rows if r["experiment"].startswith("baseline")), None)
    lines = []
    for r in rows:
        cpu = r["bot_cpu_ms_per_message"]
        delta = "" if base is None or r is base else f"{cpu - base['bot_cpu_ms_per_message']:+.1f}"
        lines.append([r["experiment"], r["e2e_ms"]["p50"], r["e2e_ms"]["p99"],
                      r["graph_ms"].get("p50", float("nan")),
                      cpu, delta, f"{r['phase']['others_cores']:.2f}"])
    print(table(["experiment", "e2e p50 ms", "e2e p99 ms", "graph p50 ms", "bot CPU ms/msg",
                 "vs baseline", "other load"], lines,
                title=f"Experiments ({args.db}, {args.users} users x {args.rounds} messages)"))
    print("\npatches:")
    for name, (description, _fn) in PATCHES.items():
        print(f"  {name}: {description}")
    path = write_result(args.name, {"explain": EXPLAIN, "results": rows,
                                    "patches": {k: v[0] for k, v in PATCHES.items()}})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
