"""`pip install .` (no extras) must not bring load-test or local-stack packages.

Resolves the installation without installing anything (`pip install --dry-run
--report`) and fails naming any such package.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS_ONLY = {"matplotlib", "hdrhistogram", "locust", "supervisor", "gevent"}


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--report",
                str(report),
                str(root),
            ],
            check=True,
        )
        names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    found = sorted(names & TOOLS_ONLY)
    print(f"pip install . resolves {len(names)} packages; tools among them: {found or 'none'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
