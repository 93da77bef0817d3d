"""The APIs' descriptions and their routes are one: every route is described, every
described operation is routed (the public API: gateway/openapi.json; the admin API:
flashclaim/ops/openapi-admin.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from aiohttp import web

import gateway
from flashclaim.ops import dlq_api
from gateway.handlers import routes

DESCRIPTIONS = {
    "public": (Path(gateway.__file__).parent / "openapi.json", routes),
    "admin": (Path(dlq_api.__file__).parent / "openapi-admin.json", dlq_api.routes),
}


def _routed(table: web.RouteTableDef) -> set[tuple[str, str]]:
    out = set()
    for route in table:
        assert isinstance(route, web.RouteDef)
        # aiohttp's {name:regex} is OpenAPI's {name}.
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.path)
        out.add((route.method.lower(), path))
    return out


@pytest.mark.parametrize("api", DESCRIPTIONS)
def test_every_route_is_described_and_every_description_routed(api: str) -> None:
    path, table = DESCRIPTIONS[api]
    document = json.loads(path.read_text())
    described = {(method, p) for p, item in document["paths"].items() for method in item}
    assert described == _routed(table)


@pytest.mark.parametrize("api", DESCRIPTIONS)
def test_the_description_is_openapi_3_1_with_every_reference_defined(api: str) -> None:
    path, _ = DESCRIPTIONS[api]
    document = json.loads(path.read_text())
    assert document["openapi"].startswith("3.1")
    for kind, name in re.findall(r'"#/components/(\w+)/(\w+)"', path.read_text()):
        assert name in document["components"][kind], f"{kind}/{name} is not defined"
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["responses"], operation["operationId"]
