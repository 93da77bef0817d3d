"""The lock files pin what pyproject.toml asks for, and production pins no tool."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
TOOLS_ONLY = {"matplotlib", "hdrhistogram", "locust", "supervisor"}


def pinned(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return {
        canonicalize_name(m[1]): m[2]
        for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)
    }


def wanted(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    names: set[str] = {canonicalize_name(Requirement(r).name) for r in requirements}
    return names - {"flashclaim"}


def test_the_production_lock_pins_every_dependency_and_no_tool() -> None:
    lock = pinned("requirements.lock")
    assert wanted() <= set(lock), wanted() - set(lock)
    assert not TOOLS_ONLY & set(lock)


def test_the_development_lock_pins_every_extra_and_agrees_with_production() -> None:
    dev = pinned("requirements-dev.lock")
    everything = wanted("loadtest", "devstack", "test", "dev")
    assert everything <= set(dev), everything - set(dev)
    production = pinned("requirements.lock")
    # One version of each package, whichever file it is installed from.
    assert {k: v for k, v in dev.items() if k in production} == production
