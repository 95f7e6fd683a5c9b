"""Benchmarks: what a message costs and how it scales (run with ``python -m bench [name ...]``)."""

from __future__ import annotations

NAMES = ("overhead", "throughput", "retrieval", "streaming", "startup", "agents", "memory",
         "lean")
