"""Latency samples and percentiles."""

from __future__ import annotations


class Latencies:
    def __init__(self) -> None:
        self._s: list[float] = []

    def add(self, seconds: float) -> None:
        self._s.append(seconds)

    def __len__(self) -> int:
        return len(self._s)

    def ms(self, q: float) -> float:
        if not self._s:
            return 0.0
        s = sorted(self._s)
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)
