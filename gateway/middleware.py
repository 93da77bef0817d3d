"""The gateway's own middleware: a server span for each request (the errors, the
request ids and the access line are shared with the operators' API: core/http.py)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from flashclaim.core import tracing
from flashclaim.core.http import REQUEST_ID


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span for each sampled request (when tracing is on), continuing the trace
    of a ``traceparent`` the client sent; the claim's command carries it on. A request
    that is not sampled makes no span, and its calls are not instrumented."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    name = f"{request.method} {route}" if route else request.method
    context = tracing.sampled(request.headers, name)
    if context is None:
        with tracing.untraced():
            return await handler(request)
    with tracing.tracer().start_as_current_span(
        name,
        context=context,
        kind=tracing.SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "url.path": request.path,
            **({"http.route": route} if route else {}),
        },
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if REQUEST_ID in request:
            span.set_attribute("flashclaim.request_id", request[REQUEST_ID])
        if response.status >= 500:
            span.set_status(tracing.StatusCode.ERROR)
        return response
