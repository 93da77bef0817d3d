"""Every derived file is what its source gives now (``make generate`` writes them)."""

from __future__ import annotations

import pytest

from flashclaim.core.db import schema_sql
from flashclaim.core.events import NOTIFY_CHANNEL
from flashclaim.devtools import generate


@pytest.mark.parametrize("path", list(generate.GENERATED))
def test_the_derived_file_is_current(path: str) -> None:
    assert generate.stale(lambda p: p == path) == [], f"{path} is out of date: run `make generate`"


def test_the_outbox_trigger_notifies_the_channel_the_relays_listen_on() -> None:
    """The channel is named in a migration (which is history, and is never edited) and
    in the code: the migrated schema must name the code's."""
    assert f"pg_notify('{NOTIFY_CHANNEL}'" in schema_sql()
