"""Local memory retrieval latency (LocalMemory.search), warm and cold, vs memories per user."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.common import (
    Check,
    checks_table,
    database,
    install_cipher,
    new_key,
    pg_available,
    seed_memories,
    summary,
    table,
    workspace,
    write_result,
)

EXPLAIN = """\
What is measured (in this process, no bot and no HTTP)
  One user holds N memories with random unit vectors of D dimensions, inserted through the ORM
  models (encrypted exactly as LocalMemory.add_many stores them). LocalMemory.search(user, query)
  with a random vector and a few words, returning the 3 best:
  cold   a fresh LocalMemory (empty cache): loads and decrypts the user's N memories, builds the
         normalised matrix and the BM25 index, scores, then fetches the 3 hits (median of several)
  warm   the indexes are cached: score the words (BM25) and the vector (numpy), fuse, sort, fetch
         the 3 hits from SQL (and decrypt them); p50/p99 over many random queries
  (bench/memory.py measures the same search on real conversations, LoCoMo)
  score  the numpy part of a warm search alone (matrix @ query + argsort), to split CPU from SQL;
         the matrix is built here the way LocalMemory builds it, from Memories.index_rows_for
  BLAS   numpy's OpenBLAS uses OPENBLAS_NUM_THREADS threads (default: all cores); on a busy
         2-core machine its threads spin against other work, which shows in `score`
"""

COUNTS = (100, 1_000, 10_000)
DIMS = (256, 1536)
K = 3


async def measure(url: str, user_id: int, dims: int, warm_runs: int,
                  cold_runs: int) -> dict[str, Any]:
    from memory.base import MemoryQuery
    from memory.local import LocalMemory
    from storage.db import create_engine, session_maker

    def query(vector: list[float]) -> MemoryQuery:
        return MemoryQuery(f"topic number {int(rng.integers(10_000))}", vector, K)

    rng = np.random.default_rng(user_id)
    engine = create_engine(url)
    sessions = session_maker(engine)
    try:
        cold = []
        for _ in range(cold_runs):
            # Empty cache: the first search loads the index. The seeded rows name no embedder,
            # as rows stored before embedders were named: the provider's space compares them.
            memory = LocalMemory(sessions, "openai:bench")
            vector = rng.standard_normal(dims).astype(np.float32).tolist()
            began = time.perf_counter()
            hits = await memory.search(user_id, query(vector))
            cold.append((time.perf_counter() - began) * 1000)
            assert len(hits) == K
        warm = []
        for _ in range(warm_runs):
            vector = rng.standard_normal(dims).astype(np.float32).tolist()
            began = time.perf_counter()
            await memory.search(user_id, query(vector))
            warm.append((time.perf_counter() - began) * 1000)
        matrix = await user_matrix(sessions, user_id)
        score = []
        for _ in range(warm_runs):
            query = rng.standard_normal(dims).astype(np.float32)
            began = time.perf_counter()
            query /= np.linalg.norm(query)
            np.argsort(-(matrix @ query))[:K]
            score.append((time.perf_counter() - began) * 1000)
        return {"cold_ms": summary(cold), "warm_ms": summary(warm), "score_ms": summary(score),
                "matrix_mb": matrix.nbytes / 2**20}
    finally:
        await engine.dispose()


async def user_matrix(sessions: async_sessionmaker[AsyncSession], user_id: int) -> np.ndarray:
    """The user's embeddings as LocalMemory caches them: one float32 row each, L2-normalised.

    Built from the public repository rather than read out of LocalMemory's private cache.
    """
    from storage.repositories import Memories

    async with sessions() as db:
        stored = await Memories(db).index_rows_for(user_id)
    matrix = np.stack([np.frombuffer(row.embedding or b"", dtype=np.float32) for row in stored])
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


async def run_db(kind: str, counts: tuple[int, ...], dims: tuple[int, ...], warm_runs: int,
                 cold_runs: int) -> list[dict[str, Any]]:
    results = []
    async with workspace("retrieval") as work, database(kind, work, "retrieval") as db:
        user_id = 1
        for d in dims:
            for n in counts:
                began = time.perf_counter()
                await seed_memories(db.url, [user_id], n, d, seed=user_id)
                seeded = time.perf_counter() - began
                print(f"  {kind}: {n} memories x {d} dims seeded in {seeded:.1f} s", flush=True)
                cold = cold_runs if n < 10_000 else 3
                row = await measure(db.url, user_id, d, warm_runs, cold)
                results.append({"db": kind, "memories": n, "dims": d, **row})
                user_id += 1
    return results


def report(results: list[dict[str, Any]]) -> list[Check]:
    print(EXPLAIN)
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset: all cores)')}")
    rows = [[r["db"], r["memories"], r["dims"], r["warm_ms"]["p50"], r["warm_ms"]["p99"],
             r["score_ms"]["p50"], r["cold_ms"]["p50"], r["matrix_mb"]]
            for r in results]
    print(table(["db", "memories", "dims", "warm p50", "warm p99", "score p50", "cold",
                 "cached MB"], rows,
                title="LocalMemory.search, k=3 (ms)"))
    print()
    checks = []
    for r in results:
        if r["memories"] == 10_000:
            p50 = r["warm_ms"]["p50"]
            checks.append(Check(f"{r['db']}: retrieval over 10,000 x {r['dims']} (warm)",
                                "p50 <= 5 ms", f"{p50:.2f} ms", p50 <= 5.0))
    print(checks_table(checks))
    return checks


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--warm", type=int, default=200, help="warm searches per size")
    parser.add_argument("--cold", type=int, default=5, help="cold loads per size")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument("--blas-threads", type=int, default=0,
                        help="run with OPENBLAS_NUM_THREADS=N (0: as the environment says)")
    args = parser.parse_args(argv)
    if args.blas_threads and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.blas_threads):
        # OpenBLAS reads the variable when numpy is imported: start again with it set.
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
        os.execv(sys.executable, [sys.executable, "-m", "bench.retrieval", *argv])
    install_cipher(new_key())
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in kinds and not await pg_available():
        print("PostgreSQL unreachable at 127.0.0.1:5432: SQLite only")
        kinds.remove("postgresql")
    counts = tuple(int(c) for c in args.counts.split(","))
    dims = tuple(int(d) for d in args.dims.split(","))
    results = []
    for kind in kinds:
        results += await run_db(kind, counts, dims, args.warm, args.cold)
    checks = report(results)
    path = write_result("retrieval", {"explain": EXPLAIN, "results": results,
                                      "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                                      "checks": [c.__dict__ for c in checks]})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
