"""The admin socket's protocol, typed once for the server and `ctl`: what goes over the wire
comes back the same, and anything else is a `ProtocolError` with a message, never another
exception (the server answers it; it must not cost the supervisor)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# The protocol is internal (server and client ship together): its codec, on purpose.
from trio_dpsup._plane.protocol import Action, ProtocolError, Reply, Request, Skipped

REQUESTS = [
    Request(Action.STATUS),
    Request(Action.RESTART, rank=3, force=True, wait=True, rank_timeout=2.5),
    Request(Action.DRAIN, rank=0),
    Request(Action.UNDRAIN, rank=1),
    Request(Action.PAUSE_PROBES, rank=2, seconds=30.0),
    Request(Action.RESUME_PROBES, rank=2),
    Request(Action.ROLLING_RESTART, max_unavailable=2, rank_timeout=60.0),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.action.value)
def test_every_request_survives_the_wire(request_: Request) -> None:
    wire = json.loads(json.dumps(request_.to_json()))
    assert Request.from_json(wire) == request_


STATUS = {"state": "ready", "ranks": []}


@pytest.mark.parametrize(
    ("reply", "action"),
    [
        (Reply(status=STATUS, operation="a rolling restart"), Action.STATUS),
        (Reply(status=STATUS), Action.STATUS),
        (Reply(rank=1), Action.RESTART),
        (Reply(rank=1, seconds=5.0), Action.PAUSE_PROBES),
        (Reply(ranks=(0, 2), skipped=(Skipped(1, "it was starting"),), max_unavailable=1),
         Action.ROLLING_RESTART),
        (Reply.refusal("busy: a rolling restart is in progress"), Action.DRAIN),
    ],
)  # fmt: skip
def test_every_reply_survives_the_wire(reply: Reply, action: Action) -> None:
    wire = json.loads(json.dumps(reply.to_json()))
    back = Reply.from_json(wire)
    assert back == reply
    if back.ok:
        back.check(action)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "a request is a JSON object"),
        ({"action": "reboot"}, "unknown action 'reboot': one of status, restart"),
        ({"action": "drain"}, "no rank None here"),
        ({"action": "restart", "rank": "1"}, "no rank '1' here"),
        ({"action": "restart", "rank": 1.0}, "no rank 1.0 here"),
        ({"action": "pause-probes", "rank": 0, "seconds": -1}, "between 0 and 86400"),
        ({"action": "pause-probes", "rank": 0, "seconds": 1e999}, "between 0 and 86400"),
        ({"action": "rolling-restart", "max_unavailable": "2"}, "--max-unavailable must be"),
        ({"action": "rolling-restart", "rank_timeout": 0}, "--rank-timeout must be more"),
        ({"action": "restart", "rank": 0, "wait": 1}, "wait must be true or false, not 1"),
    ],
)
def test_a_malformed_request_is_named(document: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Request.from_json(document)


def test_a_reply_that_lacks_what_its_action_needs_is_malformed() -> None:
    with pytest.raises(ProtocolError, match="a reply to rolling-restart without ranks"):
        Reply.from_json({"ok": True, "rank": 1}).check(Action.ROLLING_RESTART)
    with pytest.raises(ProtocolError, match="an answer of the wrong shape"):
        Reply.from_json({"ok": True, "ranks": [0, "one"], "max_unavailable": 1})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(["action", "rank", "seconds", "force", "wait", "max_unavailable",
                          "rank_timeout", "ok", "error", "ranks", "skipped", "status"])  # fmt: skip
DOCUMENTS = st.dictionaries(FIELDS, JSON | st.sampled_from([a.value for a in Action]), max_size=6)


@pytest.mark.parametrize("message", [Request, Reply])
@settings(max_examples=300, deadline=None)
@given(document=DOCUMENTS | JSON)
def test_any_json_is_a_message_or_a_protocol_error(
    message: type[Request] | type[Reply], document: Any
) -> None:
    """Whatever comes off the socket is the protocol's or a ProtocolError with a message,
    never another exception; and what it is survives the wire again."""
    try:
        parsed = message.from_json(document)
    except ProtocolError as exc:
        error = str(exc)
    else:
        assert message.from_json(json.loads(json.dumps(parsed.to_json()))) == parsed
        return
    assert error
