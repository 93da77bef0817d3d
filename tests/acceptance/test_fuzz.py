"""No input makes the gateway answer 5xx, an HTML page, or hang."""

from __future__ import annotations

import http.client
import json
import re
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.acceptance.conftest import Services, free_port


@pytest.fixture(scope="module")
async def admin_api(api: Services) -> AsyncIterator[int]:
    """A gateway serving the admin API (on a port of its own); yields that port."""
    admin = Services(api.settings)
    port = free_port()
    await admin.start_admin(port, admin_token="a" * 40)
    yield port
    admin.stop()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
field_values = json_values | st.text(min_size=1, max_size=140)
bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "name": field_values,
            # Edge values the rules single out, as often as arbitrary ones.
            "amount": st.one_of(
                st.sampled_from([0, 1, 2_147_483_647, 2_147_483_648, -1, True, False, 1.0, "5"]),
                json_values,
            ),
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


# The README's rules, written out here on their own (not imported from the code under
# test), to say what each body must get.
_REFUSED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _valid_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= 128
        and len(value.encode("utf-8", "surrogatepass")) <= 255
        and not any(unicodedata.category(c) in _REFUSED for c in value)
    )


def _valid_amount(value: object) -> bool:
    return type(value) is int and 1 <= value <= 2_147_483_647


def answer_allowed(path: str, body: bytes, status: int, code: object) -> bool:
    """Whether (status, code) is an answer the README allows this body: a valid body
    never gets `invalid_request`, and an invalid one gets nothing else."""
    allowed = expected(path, body)
    if status not in allowed:
        return False
    if allowed == {400}:
        return code == "invalid_request"
    return _VALID_CODES.get(status, {code}) >= {code}


# What a valid body may get besides success, by status (a valid claim's only 400 is
# "sold out"; a valid name is never refused as invalid).
_VALID_CODES: dict[int, set[object]] = {
    400: {"out_of_stock"},
    404: {"coupon_not_found"},
    409: {"coupon_exists", "already_claimed"},
}


def expected(path: str, body: bytes) -> set[int]:
    def no_constants(name: str) -> object:
        raise ValueError(name)  # NaN and Infinity are not JSON

    try:
        data = json.loads(body, parse_constant=no_constants)
    except ValueError:
        return {400}
    if not isinstance(data, dict):
        return {400}
    if path == "/api/coupons":
        ok = _valid_name(data.get("name")) and _valid_amount(data.get("amount"))
        return {201, 409} if ok else {400}
    ok = _valid_name(data.get("user_id")) and _valid_name(data.get("coupon_name"))
    return {200, 202, 400, 404, 409} if ok else {400}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths, body=bodies)
def test_arbitrary_bodies_get_the_answer_the_rules_give(
    api: Services, path: str, body: bytes
) -> None:
    status, answer = post(api.base_url, path, body)
    assert answer_allowed(path, body, status, answer.get("code")), (status, answer)
    if status >= 400:
        assert isinstance(answer.get("error"), str)
        assert isinstance(answer.get("code"), str)
    if status == 201:
        # What was created reads back as it was sent.
        data = json.loads(body)
        quoted = urllib.parse.quote(data["name"], safe="")
        with urllib.request.urlopen(f"{api.base_url}/api/coupons/{quoted}", timeout=15) as r:
            assert json.loads(r.read()) == {
                "name": data["name"],
                "amount": data["amount"],
                "remaining_amount": data["amount"],
                "claimed_by": [],
            }


amounts = st.one_of(
    st.sampled_from([0, 1, 2_147_483_647, 2_147_483_648, -1, True, False, 1.0, 2.0, "5", None]),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(min_size=1, max_size=30), amount=amounts)
def test_coupon_bodies_near_the_rules_edges(api: Services, name: str, amount: object) -> None:
    """Plausible bodies, so that the edges of the amount and name rules are reached."""
    body = json.dumps({"name": f"F_{name}", "amount": amount}).encode()
    status, answer = post(api.base_url, "/api/coupons", body)
    assert answer_allowed("/api/coupons", body, status, answer.get("code")), (status, answer)


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
    if _valid_name(name):
        assert status == 200 or (status, answer["code"]) == (404, "coupon_not_found"), answer
    else:
        assert (status, answer["code"]) == (400, "invalid_request"), answer


# Inputs that once got a 500 or a dropped connection: control and format characters,
# names within 128 characters but beyond 255 UTF-8 bytes (an AMQP routing key's limit),
# and header bytes that are not UTF-8.
odd_text = st.text(
    alphabet=st.characters(
        codec=None, categories=("Cc", "Cf", "Zl", "Zp", "Lo", "So", "Ll", "Zs", "Co")
    ),
    min_size=1,
    max_size=128,
)
hostile_names = st.one_of(
    odd_text,
    st.sampled_from(
        [
            "A\u0001B",
            "line\nbreak",
            "tab\there",
            "del\x7f",
            "\u202ereversed",
            "zero\u200bwidth",
            "é" * 128,  # 128 characters, 256 bytes
            "😀" * 64,  # 64 characters, 256 bytes
            "x" * 127 + "é",  # 129 bytes: fine
            "\ud800",  # a lone surrogate, as JSON escapes can carry
        ]
    ),
)
header_bytes = st.binary(min_size=1, max_size=300).filter(
    lambda b: b"\r" not in b and b"\n" not in b
)


# Bytes that no HTTP field value may hold (RFC 9110: CTL characters other than HTAB).
# The HTTP parser refuses such a request with a plain-text 400 before any handler runs.
_CTL = frozenset([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def raw(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, bytes] | None = None
) -> tuple[int, dict[str, object]]:
    status, answer, _ = raw_with_headers(port, method, path, body, headers)
    return status, answer


def raw_with_headers(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, bytes] | None = None
) -> tuple[int, dict[str, object], http.client.HTTPMessage]:
    """One request over a fresh connection, header bytes sent as they are; a dropped
    connection fails the test, and so does a non-JSON answer to a valid HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        content = response.read()
        if any(_CTL.intersection(v) for v in (headers or {}).values()):
            return response.status, {"code": "invalid_http"}, response.msg
        assert response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(content), response.msg
    finally:
        conn.close()


def body_of(**fields: object) -> bytes:
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, as a client could send them.
    return json.dumps(fields, ensure_ascii=True).encode()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=hostile_names, user=hostile_names)
def test_hostile_names_never_get_5xx_or_a_dropped_connection(
    api: Services, name: str, user: str
) -> None:
    port = api.port
    status, answer = raw(port, "POST", "/api/coupons", body_of(name=name, amount=3))
    if _valid_name(name):
        assert status == 201 or (status, answer["code"]) == (409, "coupon_exists"), answer
    else:
        assert (status, answer["code"]) == (400, "invalid_request"), answer
    claim = body_of(user_id=user, coupon_name=name)
    status, answer = raw(port, "POST", "/api/coupons/claim", claim)
    assert answer_allowed("/api/coupons/claim", claim, status, answer.get("code")), answer
    encoded = name.encode("utf-8", "surrogatepass")
    status, answer = raw(port, "GET", "/api/coupons/" + urllib.parse.quote(encoded, safe=""))
    # Path bytes that are not UTF-8 (a lone surrogate) are read with replacement characters.
    if _valid_name(name):
        assert status == 200, answer  # created above, or earlier
    elif _valid_name(encoded.decode("utf-8", "replace")):
        assert (status, answer["code"]) == (404, "coupon_not_found"), answer
    else:
        assert (status, answer["code"]) == (400, "invalid_request"), answer


def test_control_characters_and_long_utf8_names_are_refused_before_anything_is_stored(
    api: Services,
) -> None:
    for name in ("PROMO\u0001X", "é" * 128, "😀" * 64, "a\u2028b"):
        status, answer = raw(api.port, "POST", "/api/coupons", body_of(name=name, amount=3))
        assert (status, answer["code"]) == (400, "invalid_request"), name
        status, answer = raw(
            api.port, "POST", "/api/coupons/claim", body_of(user_id=name, coupon_name="X")
        )
        assert (status, answer["code"]) == (400, "invalid_request"), name
    # 128 characters in 255 bytes is within the rules, and fully usable.
    name = "é" * 127 + "x"
    status, _ = raw(api.port, "POST", "/api/coupons", body_of(name=name, amount=3))
    assert status in (201, 409)
    status, answer = raw(
        api.port, "POST", "/api/coupons/claim", body_of(user_id="u1", coupon_name=name)
    )
    assert status in (200, 409), answer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=header_bytes)
def test_arbitrary_header_bytes_never_get_5xx(api: Services, value: bytes) -> None:
    claim = body_of(user_id="u", coupon_name="NO_SUCH_COUPON")
    sent = value.strip(b" \t")  # what the HTTP parser hands on (no surrounding OWS)
    printable = 1 <= len(sent) <= 255 and all(0x20 <= b <= 0x7E for b in sent)
    for header in ("Idempotency-Key", "X-Request-Id"):
        status, answer, headers = raw_with_headers(
            api.port, "POST", "/api/coupons/claim", claim, {header: value}
        )
        if answer["code"] == "invalid_http":
            assert status == 400 and _CTL.intersection(value)
            continue
        if header == "Idempotency-Key" and not printable:
            assert (status, answer["code"]) == (400, "invalid_request"), answer
        else:
            # A valid key goes on to the coupon's lookup; a bad X-Request-Id is replaced.
            assert (status, answer["code"]) == (404, "coupon_not_found"), answer
        if header == "X-Request-Id":
            echoed = headers["X-Request-Id"]
            assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", echoed), echoed
            if re.fullmatch(rb"[A-Za-z0-9._-]{1,128}", sent):
                assert echoed == sent.decode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=header_bytes)
def test_admin_api_answers_401_to_any_authorization_bytes(admin_api: int, value: bytes) -> None:
    for prefix in (b"", b"Bearer "):
        status, answer = raw(
            admin_api, "GET", "/admin/dlq", headers={"Authorization": prefix + value}
        )
        assert status == (400 if answer["code"] == "invalid_http" else 401), answer
