"""URLs that name several servers, one of which is used at a time.

A cluster's nodes are written as PostgreSQL's multi-host URLs write them: the hosts,
separated by commas, where one host would be, sharing everything else::

    amqp://user:secret@10.0.0.1:5672,10.0.0.2:5672,10.0.0.3:5672/vhost?heartbeat=30

is the three URLs ``amqp://user:secret@10.0.0.1:5672/vhost?heartbeat=30``, ... No host
name has a comma, and the host part starts after the credentials' last ``@``, so
splitting it at its commas is exact.
"""

from __future__ import annotations

import re

# scheme://, then the authority (up to the first / ? or #), then the rest.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#]*)(?P<rest>.*)$")


def split_hosts(url: str) -> list[str]:
    """One URL per host of ``url``, in the order written; ``ValueError`` for a URL
    without a scheme or with an empty host in its list."""
    match = _URL.match(url)
    if match is None:
        raise ValueError("not a URL (scheme://host...)")
    userinfo, at, hosts = match["authority"].rpartition("@")
    names = hosts.split(",")
    if len(names) > 1 and not all(names):
        raise ValueError("an empty host in its list of hosts")
    return [f"{match['scheme']}{userinfo}{at}{name}{match['rest']}" for name in names]
