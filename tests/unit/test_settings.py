from __future__ import annotations

import pytest

from flashclaim.core.errors import ConfigError
from flashclaim.core.settings import Settings


def test_defaults_match_the_local_stack() -> None:
    s = Settings.from_env({})
    assert s.http_port == 8080
    assert "127.0.0.1:55432" in s.database_url
    assert "127.0.0.1:55672" in s.amqp_url
    assert "127.0.0.1:56379" in s.redis_url


def test_values_are_read_with_the_prefix_and_typed() -> None:
    s = Settings.from_env(
        {
            "FLASHCLAIM_HTTP_PORT": "9090",
            "FLASHCLAIM_CLAIM_WAIT_SECONDS": "0.5",
            "FLASHCLAIM_NAMESPACE": "shop-1",
            "HTTP_PORT": "1",
        }
    )
    assert (s.http_port, s.claim_wait_seconds, s.namespace) == (9090, 0.5, "shop-1")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLASHCLAIM_HTTP_PORT": "eighty"}, "not a valid int"),
        ({"FLASHCLAIM_BATCH_SIZE": "0"}, "greater than 0"),
        ({"FLASHCLAIM_NAMESPACE": "a b"}, "NAMESPACE"),
        ({"FLASHCLAIM_DB_POOL_MIN_SIZE": "5", "FLASHCLAIM_DB_POOL_MAX_SIZE": "2"}, "exceeds"),
    ],
)
def test_bad_values_fail_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
