"""An OTLP/HTTP trace receiver that keeps nothing: what ``make bench`` exports spans to.

The bench measures what tracing costs the services (making, batching, encoding and
sending spans), not a tracing backend: none is installable here without Docker, and a
backend would share the two cores with the load. This answers ``POST /v1/traces`` with
an empty success and counts the spans it was sent (decoded with opentelemetry-proto,
which the OTLP exporter brings), in all and by ``service.name``: ``GET /spans``.
`make test-image` uses it too, in Jaeger's place.

    python bench/otlp_sink.py --port 24318
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import Counter

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SPANS = web.AppKey("spans", list)
BY_SERVICE = web.AppKey("by_service", dict[str, int])


async def traces(request: web.Request) -> web.Response:
    export = ExportTraceServiceRequest()
    export.ParseFromString(await request.read())
    for resource in export.resource_spans:
        spans = sum(len(scope.spans) for scope in resource.scope_spans)
        names = [
            a.value.string_value for a in resource.resource.attributes if a.key == "service.name"
        ]
        request.app[SPANS][0] += spans
        request.app[BY_SERVICE][names[0] if names else "?"] += spans
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(),
        content_type="application/x-protobuf",
    )


async def count(request: web.Request) -> web.Response:
    by_service = request.app[BY_SERVICE]
    return web.json_response({"spans": request.app[SPANS][0], "by_service": dict(by_service)})


async def main(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SPANS] = [0]
    app[BY_SERVICE] = Counter()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/spans", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    print(f"otlp sink: {app[SPANS][0]} spans received", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
