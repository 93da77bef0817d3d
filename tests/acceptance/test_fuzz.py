"""No input makes the gateway answer 5xx, an HTML page, or hang."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.acceptance.conftest import Services

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
field_values = json_values | st.text(min_size=1, max_size=140)
bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "name": field_values,
            "amount": json_values,
            "user_id": field_values,
            "coupon_name": field_values,
        },
    ),
    json_values,
).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
paths = st.sampled_from(["/api/coupons", "/api/coupons/claim"])


def post(base: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        base + path, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths, body=bodies)
def test_arbitrary_bodies_get_a_json_answer_below_500(
    api: Services, path: str, body: bytes
) -> None:
    status, answer = post(api.base_url, path, body)
    assert status < 500, answer
    if status >= 400:
        assert isinstance(answer.get("error"), str)
        assert isinstance(answer.get("code"), str)


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=40))
def test_arbitrary_coupon_names_in_the_path(api: Services, name: str) -> None:
    quoted = urllib.parse.quote(name, safe="")
    try:
        with urllib.request.urlopen(f"{api.base_url}/api/coupons/{quoted}", timeout=15) as r:
            status = r.status
            answer = json.loads(r.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, json.loads(error.read())
    assert status in (200, 400, 404), answer
