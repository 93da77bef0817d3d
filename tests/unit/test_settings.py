from __future__ import annotations

from pathlib import Path

import pytest

from flashclaim.core.errors import ConfigError
from flashclaim.core.settings import Settings, environ


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
        ({"FLASHCLAIM_HTTP_PORT": "eighty"}, "HTTP_PORT='eighty': .*valid integer"),
        ({"FLASHCLAIM_HTTP_PORT": "70000"}, "HTTP_PORT='70000': .*less than or equal to 65535"),
        ({"FLASHCLAIM_BATCH_SIZE": "0"}, "BATCH_SIZE='0': .*greater than 0"),
        ({"FLASHCLAIM_NAMESPACE": "a b"}, "NAMESPACE='a b'"),
        ({"FLASHCLAIM_DB_POOL_MIN_SIZE": "5", "FLASHCLAIM_DB_POOL_MAX_SIZE": "2"}, "exceeds"),
        ({"FLASHCLAIM_PARTITIONS": "-1"}, "PARTITIONS="),
        ({"FLASHCLAIM_MAX_IN_FLIGHT_CLAIMS": "0"}, "MAX_IN_FLIGHT_CLAIMS="),
        ({"FLASHCLAIM_BREAKER_RECOVERY_SECONDS": "nan"}, "BREAKER_RECOVERY_SECONDS="),
        ({"FLASHCLAIM_MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS="),
        ({"FLASHCLAIM_LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD'"),
        ({"FLASHCLAIM_CONSUMER_INDEX": "2", "FLASHCLAIM_CONSUMER_COUNT": "2"}, "CONSUMER_INDEX"),
        ({"FLASHCLAIM_ADMIN_TOKEN": "short"}, "ADMIN_TOKEN must be at least 32"),
        ({"FLASHCLAIM_AMQP_URL": "127.0.0.1:5672"}, "AMQP_URL='127.0.0.1:5672': not a URL"),
        ({"FLASHCLAIM_AMQP_MANAGEMENT_URL": "http://a,,b/"}, "MANAGEMENT_URL=.*empty host"),
        ({"FLASHCLAIM_INBOX_RETENTION_SECONDS": "86400"}, "must exceed .*RESULT_TTL_SECONDS"),
        (
            {"FLASHCLAIM_RESULT_TTL_SECONDS": "60", "FLASHCLAIM_INBOX_RETENTION_SECONDS": "600"},
            "must exceed .*GATEWAY_ANSWER_TTL_SECONDS",
        ),
        ({"FLASHCLAIM_CONSOLE_METRICS_URLS": "ftp://x/"}, "not an http.s. URL: 'ftp://x/'"),
        ({"FLASHCLAIM_CONSOLE_METRICS_URLS": "http://x:99999/"}, "not an http.s. URL"),
    ],
)
def test_bad_values_fail_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_every_bad_variable_is_named_at_once_and_secrets_are_not_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {
                "FLASHCLAIM_HTTP_PORT": "x",
                "FLASHCLAIM_BATCH_SIZE": "0",
                "FLASHCLAIM_IDEMPOTENCY_SECRET": 5 * "s3cret",
            }
        )
    message = str(caught.value)
    assert "HTTP_PORT" in message and "BATCH_SIZE" in message
    assert "s3cret" not in message
    assert Settings.from_env({"FLASHCLAIM_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert "s3cret" not in repr(Settings.from_env({"FLASHCLAIM_ADMIN_TOKEN": 8 * "s3cret"}))
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"FLASHCLAIM_AMQP_URL": "amqp://flashclaim:s3cret@h1,,h2/"})
    assert "s3cret" not in str(caught.value) and "flashclaim:***@h1" in str(caught.value)


def test_a_cluster_is_one_url_with_several_hosts() -> None:
    s = Settings.from_env(
        {
            "FLASHCLAIM_AMQP_URL": "amqp://u:p@10.0.0.1:5672,10.0.0.2:5672/",
            "FLASHCLAIM_AMQP_MANAGEMENT_URL": "http://10.0.0.1:15672,10.0.0.2:15672/",
        }
    )
    assert s.amqp_url == "amqp://u:p@10.0.0.1:5672,10.0.0.2:5672/"
    assert Settings.from_env({"FLASHCLAIM_AMQP_MANAGEMENT_URL": ""}).amqp_management_url == ""


def test_settings_given_to_a_process_are_read_back_unchanged() -> None:
    """Every tool starts services with ``environ``/``Settings.environ``: a process must
    see exactly the settings it was given (the defaults included)."""
    given = Settings(
        http_port=9999,
        claim_wait_seconds=0.25,
        namespace="shop-2",
        admin_token="a" * 40,
        instance_id="consumer-7",
    )
    assert Settings.from_env(given.environ()) == given
    assert environ(http_port=1, admin_token=None) == {"FLASHCLAIM_HTTP_PORT": "1"}
    with pytest.raises(TypeError, match="no such setting: htp_port"):
        environ(htp_port=1)


def test_a_secret_can_come_from_a_file(tmp_path: Path) -> None:
    """``FLASHCLAIM_<NAME>_FILE``, as Docker and Kubernetes mount secrets: the file's
    content, without its final line break; both forms at once is an error."""
    token = tmp_path / "admin-token"
    token.write_text("t" * 40 + "\n")
    url = tmp_path / "database-url"
    url.write_text("postgresql://svc:pw@db:5432/flashclaim")
    settings = Settings.from_env(
        {
            "FLASHCLAIM_ADMIN_TOKEN_FILE": str(token),
            "FLASHCLAIM_DATABASE_URL_FILE": str(url),
        }
    )
    assert settings.admin_token.get_secret_value() == "t" * 40
    assert settings.database_url == "postgresql://svc:pw@db:5432/flashclaim"
    with pytest.raises(ConfigError, match="ADMIN_TOKEN and FLASHCLAIM_ADMIN_TOKEN_FILE"):
        Settings.from_env(
            {"FLASHCLAIM_ADMIN_TOKEN": "u" * 40, "FLASHCLAIM_ADMIN_TOKEN_FILE": str(token)}
        )
    with pytest.raises(ConfigError, match=r"FLASHCLAIM_ADMIN_TOKEN_FILE=.*FileNotFoundError"):
        Settings.from_env({"FLASHCLAIM_ADMIN_TOKEN_FILE": str(tmp_path / "absent")})
    # A secret read from a file that is too short is reported without its content.
    token.write_text("short")
    with pytest.raises(ConfigError) as short:
        Settings.from_env({"FLASHCLAIM_ADMIN_TOKEN_FILE": str(token)})
    assert "short" not in str(short.value)


def test_a_renamed_variable_is_still_read_under_its_new_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = Settings.from_env({"FLASHCLAIM_FAST_ANSWER_TTL_SECONDS": "30"})
    assert old.gateway_answer_ttl_seconds == 30
    assert "FLASHCLAIM_GATEWAY_ANSWER_TTL_SECONDS" in caplog.text
    both = {
        "FLASHCLAIM_FAST_ANSWER_TTL_SECONDS": "30",
        "FLASHCLAIM_GATEWAY_ANSWER_TTL_SECONDS": "40",
    }
    assert Settings.from_env(both).gateway_answer_ttl_seconds == 40  # the new name wins
