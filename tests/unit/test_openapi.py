"""The public API's description (gateway/openapi.json) and the gateway's routes are one:
every route is described, every described operation is routed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from aiohttp import web

import gateway
from gateway.handlers import routes

DESCRIPTION = Path(gateway.__file__).parent / "openapi.json"


def _routed() -> set[tuple[str, str]]:
    out = set()
    for route in routes:
        assert isinstance(route, web.RouteDef)
        # aiohttp's {name:regex} is OpenAPI's {name}.
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.path)
        out.add((route.method.lower(), path))
    return out


def test_every_route_is_described_and_every_description_routed() -> None:
    document = json.loads(DESCRIPTION.read_text())
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert described == _routed()


def test_the_description_is_openapi_3_1_with_every_reference_defined() -> None:
    document = json.loads(DESCRIPTION.read_text())
    assert document["openapi"].startswith("3.1")
    text = DESCRIPTION.read_text()
    for kind, name in re.findall(r'"#/components/(\w+)/(\w+)"', text):
        assert name in document["components"][kind], f"{kind}/{name} is not defined"
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["responses"], operation["operationId"]
