"""What `make bench` reads off the machine: CPU time and peak memory of each process,
wrk's and pgbench's figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flashclaim.devtools.loadreport import Recorder

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def group(pgid: int) -> list[int]:
    """Every live process of a process group (a server and the helpers it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def family(pid: int) -> list[int]:
    """A process and its children (PostgreSQL's backends each lead a session of their
    own, so its process group is just the postmaster)."""
    return [pid, *children(pid)]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(t) for t in (task / "children").read_text().split()]
    return found


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` its peak), in
    MB; NaN once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def peak_rss_mb(pid: int) -> float:
    return memory_mb(pid, "VmHWM")


def pss_mb(pids: list[int]) -> float:
    """The proportional set size of these processes together, in MB: shared pages
    (PostgreSQL's shared buffers) counted once over the processes sharing them, where
    their RSS would count them in each."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        total += int(match.group(1)) if match else 0
    return total / 1024


def own_cpu_seconds() -> float:
    """This process's CPU time, plus that of its children that have ended (wrk)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class CpuMeter:
    """CPU seconds per named process set between ``start`` and ``stop``; the sets are
    found again at each reading (workers replaced, server helpers started). The load
    generator is this process and the children it waited for."""

    processes: Mapping[str, Callable[[], list[int]]]

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        return {name: after[name] - self._before.get(name, 0.0) for name in after}

    def _read(self) -> dict[str, float]:
        readings = {name: cpu_seconds(pids()) for name, pids in self.processes.items()}
        readings["load generator"] = own_cpu_seconds()
        return readings


def wrk(
    url: str, script: Path, args: list[str], seconds: int, connections: int
) -> dict[str, float]:
    """Run wrk (2 threads); return requests/s and the count of non-2xx answers."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    if rate is None or total is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return {
        "rate": float(rate.group(1)),
        "requests": float(total.group(1)),
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
    }


def build_openloop(out: Path) -> Path:
    """Compile bench/openloop (Go, standard library only) to ``out``."""
    source = Path(__file__).parent / "openloop" / "main.go"
    subprocess.run(["go", "build", "-o", str(out), str(source)], check=True)
    return out


def openloop(
    binary: Path, url: str, coupon: str, rate: int, seconds: int, users: str
) -> tuple[Recorder, float]:
    """Claims at ``rate`` a second for ``seconds`` (bench/openloop): each one's latency
    from when it was due, by the second of the run it was answered in; and how long the
    run took (until the last answer)."""
    started = time.monotonic()
    done = subprocess.run(
        [
            str(binary),
            f"-url={url}",
            f"-coupon={coupon}",
            f"-rate={rate}",
            f"-duration={seconds}s",
            f"-users={users}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    recorder = Recorder()
    for line in done.stdout.splitlines():
        due_us, latency_us, status, _ = (int(x) for x in line.split())
        # By the second it was answered in, as the project's own generator records.
        recorder.record_at((due_us + latency_us) / 1e6, status, latency_us / 1e6)
    recorder.sent = int(rate * seconds)
    recorder.dropped = recorder.sent - recorder.done
    for line in done.stderr.splitlines():
        print(f"bench: {line}", file=sys.stderr)
    return recorder, time.monotonic() - started


def pgbench(
    bindir: Path, port: int, script: Path, seconds: int, clients: int, database: str
) -> float:
    """Transactions per second of ``script`` with ``clients`` connections."""
    result = subprocess.run(
        [
            str(bindir / "pgbench"),
            "-n",
            f"-c{clients}",
            f"-j{min(clients, 2)}",
            f"-T{seconds}",
            "-f",
            str(script),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "flashclaim",
            database,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"tps = ([\d.]+)", result.stdout)
    if not match:
        raise RuntimeError(f"pgbench printed no tps:\n{result.stdout}\n{result.stderr}")
    return float(match.group(1))
