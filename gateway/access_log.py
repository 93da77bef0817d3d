"""One canonical JSON log line per HTTP request."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.state import CLAIM_ID, COUPON, ERROR, OUTCOME, PRINCIPAL, REQUEST_ID


class CanonicalAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": request.get(REQUEST_ID),
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
        }
        if PRINCIPAL in request:  # the token's user (never the token)
            fields["user"] = request[PRINCIPAL].user_id
        for key, name in (
            (CLAIM_ID, "claim_id"),
            (COUPON, "coupon"),
            (OUTCOME, "outcome"),
            (ERROR, "error"),
        ):
            if key in request:
                fields[name] = request[key]
        self.logger.info("request", extra=fields)
