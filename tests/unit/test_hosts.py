from __future__ import annotations

import pytest

from flashclaim.core.hosts import split_hosts


@pytest.mark.parametrize(
    ("url", "urls"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", ["amqp://guest:guest@127.0.0.1:5672/"]),
        (
            "amqp://u:p@h1:5672,h2:5673,h3/vh?heartbeat=30",
            [
                "amqp://u:p@h1:5672/vh?heartbeat=30",
                "amqp://u:p@h2:5673/vh?heartbeat=30",
                "amqp://u:p@h3/vh?heartbeat=30",
            ],
        ),
        # Credentials end at the last @; a comma or @ in a password stays in it.
        ("amqp://u:p,@x@h1,h2", ["amqp://u:p,@x@h1", "amqp://u:p,@x@h2"]),
        ("http://[::1]:15672,[::1]:15673/", ["http://[::1]:15672/", "http://[::1]:15673/"]),
        ("http://h1,h2?x=a,b", ["http://h1?x=a,b", "http://h2?x=a,b"]),
    ],
)
def test_each_host_gets_the_rest_of_the_url(url: str, urls: list[str]) -> None:
    assert split_hosts(url) == urls


@pytest.mark.parametrize("url", ["127.0.0.1:5672", "amqp://h1,,h2/", "amqp://h1,/"])
def test_a_url_without_scheme_or_with_an_empty_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        split_hosts(url)
