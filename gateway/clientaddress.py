"""Who the client is, when the gateway stands behind proxies (an ingress, a load
balancer): every request then comes from a proxy's address, and a per-client limit keyed
on it would be one bucket for everyone.

``X-Forwarded-For`` lists the addresses a request passed through, each proxy appending
the peer it saw; anyone can write the list's beginning. So it is read from the right,
and only while the hop that wrote an entry is trusted (``TRUSTED_PROXIES``): the first
address a trusted proxy did not itself come from is the client. A request whose peer is
not a trusted proxy is its own client, whatever it claims; an entry that is not an
address ends the walk (the last trusted hop's word is taken, no further).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from flashclaim.core.settings import ProxyNetwork


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _trusted(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, proxies: Sequence[ProxyNetwork]
) -> bool:
    return ip is not None and any(ip in network for network in proxies)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[ProxyNetwork]
) -> str:
    """The client of a request from ``peer`` carrying the ``X-Forwarded-For`` header
    values ``forwarded_for`` (in order), behind ``proxies``."""
    client = peer or "unknown"
    if not _trusted(_parse(client), proxies):
        return client
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        ip = _parse(hop)
        if ip is None:
            return client
        client = hop
        if not _trusted(ip, proxies):
            return client
    return client
