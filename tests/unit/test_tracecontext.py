"""Trace context parsing from comments: W3C traceparent/tracestate and Jaeger uber-trace-id."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongoproxy import tracecontext as tc
from mongoproxy.tracecontext import MalformedContext, TraceContext

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- traceparent ----


def test_traceparent_sampled():
    assert tc.parse_traceparent(TP) == TraceContext(TRACE, SPAN, True)


def test_traceparent_not_sampled_and_other_flag_bits():
    assert tc.parse_traceparent(TP[:-2] + "00").sampled is False
    assert tc.parse_traceparent(TP[:-2] + "02").sampled is False  # only bit 0 means sampled
    assert tc.parse_traceparent(TP[:-2] + "03").sampled is True


def test_traceparent_surrounding_whitespace_is_ignored():
    assert tc.parse_traceparent(f"  {TP}\n").trace_id == TRACE


def test_traceparent_future_version_may_carry_more_fields():
    ctx = tc.parse_traceparent("cc" + TP[2:] + "-what-the-future-holds")
    assert (ctx.trace_id, ctx.span_id, ctx.sampled) == (TRACE, SPAN, True)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("", "not 00-"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "not 00-"),  # no flags
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", "not 00-"),  # 31-digit trace id
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "not 00-"),  # uppercase is invalid
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01", "not 00-"),
        ("00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", "not 00-"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "trace id is all zeros"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "parent id is all zeros"),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version ff"),
        (TP + "-extra", "exactly four fields"),
    ],
)
def test_traceparent_malformed(bad, why):
    with pytest.raises(MalformedContext, match=why):
        tc.parse_traceparent(bad)


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans())
def test_traceparent_round_trip(trace_id, span_id, sampled):
    text = tc.format_traceparent(trace_id, span_id, sampled)
    assert tc.parse_traceparent(text) == TraceContext(trace_id, span_id, sampled)
    assert tc.from_comment(text) == TraceContext(trace_id, span_id, sampled)


# ---- tracestate ----


def test_tracestate_members_in_order():
    assert tc.parse_tracestate("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE,,vendor@tenant=x") == (
        ("rojo", "00f067aa0ba902b7"),
        ("congo", "t61rcWkgMzE"),
        ("vendor@tenant", "x"),
    )


@pytest.mark.parametrize(
    "bad",
    [
        "Rojo=1",  # keys are lowercase
        "rojo",  # no '='
        "rojo=1,rojo=2",  # duplicate key
        "rojo=a,b",  # a member without '='
        "rojo=bad=value",  # '=' is not allowed in a value
        "rojo=in\tvalue",  # tab is not a value character
        ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
    ],
)
def test_tracestate_malformed_is_discarded(bad):
    assert tc.parse_tracestate(bad) == ()


def test_tracestate_optional_whitespace_around_members():
    assert tc.parse_tracestate(" rojo=1 ,\tcongo=2\t") == (("rojo", "1"), ("congo", "2"))


def test_tracestate_absent():
    assert tc.parse_tracestate(None) == ()
    assert tc.parse_tracestate("") == ()


# ---- uber-trace-id ----


def test_uber_trace_id_128_bit():
    ctx = tc.parse_uber_trace_id("4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1")
    assert ctx == TraceContext(TRACE, SPAN, True, (), "jaeger")


def test_uber_trace_id_short_ids_and_flags():
    ctx = tc.parse_uber_trace_id("abc:de:0:0")
    assert (ctx.trace_id, ctx.span_id, ctx.sampled) == (0xABC, 0xDE, False)
    assert tc.parse_uber_trace_id("abc:de:0:2").sampled is True  # debug implies sampled
    assert tc.parse_uber_trace_id("ABC:DE:0:03").sampled is True


def test_uber_trace_id_url_encoded():
    ctx = tc.parse_uber_trace_id("abc%3Ade%3A0%3A1")
    assert (ctx.trace_id, ctx.span_id, ctx.sampled) == (0xABC, 0xDE, True)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("abc:de:0", "<trace>:<span>:<parent>:<flags>"),
        ("abc:de:0:1:5", "<trace>:<span>:<parent>:<flags>"),
        ("xyz:de:0:1", "trace id"),
        ("1" * 33 + ":de:0:1", "trace id"),
        ("abc:" + "1" * 17 + ":0:1", "span id"),
        ("abc::0:1", "span id"),
        ("abc:de:zz:1", "parent id"),
        ("abc:de:0:100", "flags"),
        ("0:de:0:1", "trace id is zero"),
        ("abc:0:0:1", "span id is zero"),
    ],
)
def test_uber_trace_id_malformed(bad, why):
    with pytest.raises(MalformedContext, match=why):
        tc.parse_uber_trace_id(bad)


# ---- comments ----


@pytest.mark.parametrize(
    "comment",
    [
        TP,
        f"  {TP}  ",
        f"traceparent={TP}",
        f"checkout:load-cart traceparent={TP} user=42",
        f"traceparent:{TP}",  # the Rust mongoproxy's form
        f"TraceParent = {TP}",
        f"/*traceparent='{TP}'*/",  # sqlcommenter
        f'{{"traceparent": "{TP}"}}',  # JSON text in a string comment
        f"a=1;traceparent={TP};b=2",
        f"traceparent={TP},tracestate=x=1",
    ],
)
def test_comment_forms_with_traceparent(comment):
    ctx = tc.from_comment(comment)
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.format) == (TRACE, SPAN, True, "w3c")


def test_comment_with_tracestate_forms():
    assert tc.from_comment(f"traceparent={TP} tracestate=rojo=1,congo=2").tracestate == (("rojo", "1"), ("congo", "2"))
    # sqlcommenter quotes and URL-encodes the value.
    assert tc.from_comment(f"/*traceparent='{TP}',tracestate='rojo%3D1%2Ccongo%3D2'*/").tracestate == (
        ("rojo", "1"),
        ("congo", "2"),
    )
    assert tc.from_comment(f'{{"traceparent":"{TP}","tracestate":"rojo=1"}}').tracestate == (("rojo", "1"),)
    # A bad tracestate is dropped; the traceparent still counts.
    ctx = tc.from_comment(f"traceparent={TP} tracestate=BAD")
    assert ctx.trace_id == TRACE and ctx.tracestate == ()


@pytest.mark.parametrize(
    "comment",
    [
        "uber-trace-id:4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1",
        "uber-trace-id=4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1",
        "job=nightly uber-trace-id:4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1 attempt=2",
        "Uber-Trace-Id: 4bf92f3577b34da6a3ce929d0e0e4736%3A00f067aa0ba902b7%3A0%3A1",
    ],
)
def test_comment_forms_with_uber_trace_id(comment):
    ctx = tc.from_comment(comment)
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.format) == (TRACE, SPAN, True, "jaeger")


@pytest.mark.parametrize(
    "comment",
    [
        None,
        "",
        "nightly report",
        "no traceparent here",
        "trace me please",
        "x" * 512,
        "00-but-not-a-traceparent",
    ],
)
def test_comment_without_context(comment):
    assert tc.from_comment(comment) is None


@pytest.mark.parametrize(
    "comment",
    [
        "traceparent=00-abc-def-01",
        "traceparent=",
        "uber-trace-id:nothex:1:0:1",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",  # bare, wrong flags
    ],
)
def test_comment_with_malformed_context(comment):
    with pytest.raises(MalformedContext):
        tc.from_comment(comment)


def test_traceparent_wins_over_uber_trace_id():
    ctx = tc.from_comment(f"uber-trace-id:abc:de:0:1 traceparent={TP}")
    assert ctx.format == "w3c" and ctx.trace_id == TRACE


@given(
    st.text(alphabet="abcdefgh ijklmno,;", max_size=40),
    st.text(alphabet="pqrstuvwxyz ,;", max_size=40),
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
)
def test_traceparent_found_anywhere_in_a_string(prefix, suffix, trace_id, span_id):
    comment = f"{prefix} traceparent={tc.format_traceparent(trace_id, span_id)} {suffix}"
    assert tc.from_comment(comment) == TraceContext(trace_id, span_id, True)


@given(st.text(max_size=200))
def test_any_comment_gives_a_context_none_or_malformed(text):
    try:
        result = tc.from_comment(text)
    except MalformedContext:
        return
    assert result is None or isinstance(result, TraceContext)


# ---- document comments ----


def test_document_comment():
    assert tc.from_document(TP, "rojo=1") == TraceContext(TRACE, SPAN, True, (("rojo", "1"),))
    assert tc.from_document(TP) == TraceContext(TRACE, SPAN, True)
    assert tc.from_document(None, "rojo=1") is None
    with pytest.raises(MalformedContext):
        tc.from_document("00-nope")
