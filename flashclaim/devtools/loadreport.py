"""What a load test measured: latency histograms, status counts, a timeline, and the
JSON report and PNG chart written from them."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_MAX_US = 120_000_000  # two minutes


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _MAX_US, 3)


@dataclass
class Recorder:
    """Latencies in microseconds, overall and per second of the run."""

    started: float = field(default_factory=time.monotonic)
    overall: HdrHistogram = field(default_factory=_histogram)
    per_second: dict[int, HdrHistogram] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    dropped: int = 0  # not sent: too many requests already outstanding
    errors: Counter[str] = field(default_factory=Counter)

    def record(self, status: int, latency_s: float) -> None:
        self.record_at(time.monotonic() - self.started, status, latency_s)

    def record_at(self, offset_s: float, status: int, latency_s: float) -> None:
        """An answer in the second ``offset_s`` falls in (from :attr:`started`)."""
        micros = min(max(1, int(latency_s * 1_000_000)), _MAX_US)
        self.overall.record_value(micros)
        second = int(offset_s)
        if second not in self.per_second:
            self.per_second[second] = _histogram()
        self.per_second[second].record_value(micros)
        self.statuses[status] += 1

    def merged(self, seconds: Iterable[int]) -> HdrHistogram | None:
        """The answers of these seconds of the run in one histogram (``None``: none)."""
        merged: HdrHistogram | None = None
        for second in seconds:
            h = self.per_second.get(second)
            if h is not None:
                if merged is None:
                    merged = _histogram()
                merged.add(h)
        return merged

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    def percentiles_ms(self, histogram: HdrHistogram | None = None) -> dict[str, float]:
        h = histogram or self.overall
        out = {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
        out["max"] = h.get_max_value() / 1000
        return out

    def progress_line(self) -> str:
        elapsed = time.monotonic() - self.started
        last = self.per_second.get(int(elapsed) - 1)
        rate = last.get_total_count() if last else 0
        p99 = last.get_value_at_percentile(99) / 1000 if last else 0.0
        codes = " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items()))
        return (
            f"[{elapsed:6.1f}s] sent {self.sent} done {self.done} {rate}/s p99 {p99:.1f}ms  {codes}"
        )

    def timeline(self) -> list[dict[str, Any]]:
        rows = []
        for second in sorted(self.per_second):
            h = self.per_second[second]
            rows.append(
                {"second": second, "completed": h.get_total_count(), **self.percentiles_ms(h)}
            )
        return rows


@dataclass
class Report:
    scenario: str
    parameters: dict[str, Any]
    recorder: Recorder
    seconds: float
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    @property
    def throughput(self) -> float:
        return self.recorder.done / self.seconds if self.seconds > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        r = self.recorder
        return {
            "scenario": self.scenario,
            "parameters": self.parameters,
            "seconds": round(self.seconds, 3),
            "sent": r.sent,
            "completed": r.done,
            "dropped": r.dropped,
            "throughput_per_s": round(self.throughput, 1),
            "latency_ms": self.percentiles_ms(),
            "statuses": {str(k): v for k, v in sorted(r.statuses.items())},
            "errors": dict(r.errors),
            "checks": self.checks,
            "ok": self.ok,
            "details": self.details,
            "timeline": r.timeline(),
        }

    def percentiles_ms(self) -> dict[str, float]:
        return self.recorder.percentiles_ms()

    def summary(self) -> str:
        lat = self.percentiles_ms()
        codes = ", ".join(f"{v}x{k}" for k, v in sorted(self.recorder.statuses.items()))
        failed = [name for name, ok in self.checks.items() if not ok]
        lines = [
            f"scenario    {self.scenario}  {self.parameters}",
            f"throughput  {self.throughput:,.0f} answers/s over {self.seconds:.1f}s "
            f"({self.recorder.done} answers, {self.recorder.dropped} not sent)",
            "latency ms  " + "  ".join(f"{k} {v:.1f}" for k, v in lat.items()),
            f"statuses    {codes}",
            "checks      " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)),
        ]
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2))

    def write_chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.recorder.timeline()
        seconds = [r["second"] for r in rows]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        top.plot(seconds, [r["completed"] for r in rows], label="answers/s")
        if "rate" in self.parameters:
            top.axhline(self.parameters["rate"], color="grey", linestyle="--", label="offered")
        top.set_ylabel("answers per second")
        top.legend(loc="lower right")
        top.set_title(f"flashclaim loadtest: {self.scenario}")
        for key in ("p50", "p90", "p99", "p99.9"):
            bottom.plot(seconds, [max(r[key], 0.01) for r in rows], label=key)
        bottom.set_yscale("log")
        bottom.set_ylabel("latency (ms)")
        bottom.set_xlabel("second of the run")
        bottom.legend(loc="upper left")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
