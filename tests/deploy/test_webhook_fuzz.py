"""Whatever a sender sends, the receiver answers 4xx or 503, never 500: Hypothesis-generated bodies and
headers, unsigned and signed, against the real app (its Prefect API is down, so a valid delivery is 503)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ALLOWED = {401, 413, 422, 503}

header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# bodies shaped like the real one, with every field possibly wrong
near_miss = st.fixed_dictionaries(
    {},
    optional={
        "checkpoint": json_values,
        "run_id": json_values,
        "step": json_values | st.integers(min_value=-5, max_value=10**20),
        "dataset": json_values,
        "config": json_values,
        "stages": json_values,
        "tags": json_values,
        "callback_url": json_values | st.sampled_from(["ftp://x", "http://ok", "javascript:alert(1)"]),
        "extra": json_values,
    },
)


@pytest.fixture(scope="module")
def client() -> Iterator:
    import os

    from fastapi.testclient import TestClient

    saved = os.environ.get("MICROSCOPE_WEBHOOK_SECRET")
    os.environ["MICROSCOPE_WEBHOOK_SECRET"] = SECRET
    try:
        from deployments.webhook import create_app

        with TestClient(create_app(prefect_url="http://127.0.0.1:9/api")) as c:
            yield c
    finally:
        if saved is None:
            os.environ.pop("MICROSCOPE_WEBHOOK_SECRET", None)
        else:
            os.environ["MICROSCOPE_WEBHOOK_SECRET"] = saved


def _signed(body: str) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    msg_id, now = f"msg_{uuid.uuid4().hex}", datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(msg_id, now, body),
    }


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    body=st.binary(max_size=512) | st.text(max_size=512).map(str.encode),
    headers=st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x-other"]),
        header_text,
        max_size=5,
    ),
)
def test_unsigned_or_forged_deliveries_are_refused(client, body: bytes, headers: dict[str, str]) -> None:
    r = client.post("/v1/checkpoints", content=body, headers=headers)
    assert r.status_code in ALLOWED - {503}, (r.status_code, r.text)
    assert "detail" in r.json()


@FUZZ
@given(payload=near_miss | json_values)
def test_signed_bodies_of_any_shape_never_500(client, payload) -> None:
    body = json.dumps(payload)
    r = client.post("/v1/checkpoints", content=body, headers=_signed(body))
    assert r.status_code in {422, 503}, (r.status_code, r.text)  # 503: a valid body; Prefect is down here
    if r.status_code == 503:
        assert r.headers["retry-after"] == "5"


@FUZZ
@given(
    flow_run_id=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/?#%"), max_size=60)
    .filter(lambda s: s not in (".", ".."))
    .map(lambda s: quote(s, safe=""))
)
def test_status_queries_never_500(client, flow_run_id: str) -> None:
    r = client.get(f"/v1/checkpoints/{flow_run_id}", headers=_signed(""))
    assert r.status_code in {404, 405, 422, 503}, (r.status_code, r.text)  # 405: an empty id is the POST route
