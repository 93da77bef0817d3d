"""The client behind proxies (gateway/clientaddress.py): X-Forwarded-For is believed
only as far as trusted proxies wrote it."""

from __future__ import annotations

import pytest

from flashclaim.core.errors import ConfigError
from flashclaim.core.settings import Settings, proxy_networks
from gateway.clientaddress import client_address

INGRESS = proxy_networks("10.0.0.0/8, fd00::/8")


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("10.1.2.3", ["203.0.113.9"], ()) == "10.1.2.3"


def test_an_untrusted_peer_is_its_own_client_whatever_it_claims() -> None:
    assert client_address("198.51.100.7", ["203.0.113.9"], INGRESS) == "198.51.100.7"


def test_behind_the_ingress_the_client_is_the_address_it_saw() -> None:
    assert client_address("10.1.2.3", ["203.0.113.9"], INGRESS) == "203.0.113.9"
    # Two clients through one ingress are two clients.
    assert client_address("10.1.2.3", ["203.0.113.10"], INGRESS) == "203.0.113.10"


def test_what_the_client_wrote_itself_is_not_believed() -> None:
    # The client sent "X-Forwarded-For: 1.2.3.4"; the ingress appended the client's own.
    assert client_address("10.1.2.3", ["1.2.3.4, 203.0.113.9"], INGRESS) == "203.0.113.9"
    # Split over several header lines, the same.
    assert client_address("10.1.2.3", ["1.2.3.4", "203.0.113.9"], INGRESS) == "203.0.113.9"


def test_a_chain_of_trusted_proxies_is_walked_to_the_first_untrusted_hop() -> None:
    assert client_address("10.0.0.1", ["203.0.113.9, 10.9.9.9"], INGRESS) == "203.0.113.9"
    assert client_address("fd00::1", ["2001:db8::5"], INGRESS) == "2001:db8::5"
    # Every hop trusted: the farthest one is the client.
    assert client_address("10.0.0.1", ["10.5.5.5, 10.9.9.9"], INGRESS) == "10.5.5.5"


def test_garbage_ends_the_walk_at_the_last_trusted_word() -> None:
    assert client_address("10.0.0.1", ["not-an-ip"], INGRESS) == "10.0.0.1"
    assert client_address("10.0.0.1", ["1.2.3.4, junk, 10.9.9.9"], INGRESS) == "10.9.9.9"
    assert client_address("10.0.0.1", [], INGRESS) == "10.0.0.1"
    assert client_address(None, [], INGRESS) == "unknown"


def test_trusted_proxies_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        Settings.from_env({"FLASHCLAIM_TRUSTED_PROXIES": "10.0.0.0/8, ingress"})
    assert Settings.from_env({"FLASHCLAIM_TRUSTED_PROXIES": "10.0.0.0/8,::1"})
