"""The recording's options (--record and its companions, with their size and duration parsers) and create()."""

from __future__ import annotations

import os
from typing import Any

from mongoproxy.config import Option, non_negative_float
from mongoproxy.errors import ConfigError
from mongoproxy.namespaces import ns_list_parser
from mongoproxy.sinks.capture.sink import CaptureSink
from mongoproxy.sinks.capture.state import DEFAULT_MAX_BYTES, DEFAULT_QUEUE_BYTES, DEFAULT_ROTATE_SECONDS

G = "recording"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
}


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(flag: str):
    """Seconds: 3600, 90m, 12h, 7d."""

    def parse(value: Any) -> float:
        text = str(value).strip().lower()
        digits = text.rstrip("smhd")
        unit = text[len(digits) :]
        try:
            seconds = float(digits) * _DURATION_UNITS[unit]
        except (ValueError, KeyError):
            raise ConfigError(f"{flag} {value!r} is not a duration: give seconds or e.g. 90m, 12h, 7d") from None
        if not 0 < seconds < float("inf"):
            raise ConfigError(f"{flag} must be positive, got {value!r}")
        return seconds

    return parse


def parse_size(flag: str):
    """A byte count: 1000000, 100MB, 64MiB, 1G."""

    def parse(value: Any) -> int:
        text = str(value).strip().lower().replace("_", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :].strip()
        try:
            number = float(digits)
        except ValueError:
            raise ConfigError(f"{flag} {value!r} is not a size: give bytes, e.g. 100000000, 100MB or 64MiB") from None
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{flag} {value!r}: unknown unit {unit!r}; use B, KB, MB, GB, KiB, MiB or GiB")
        n = int(number * _SIZE_UNITS[unit])
        if n <= 0:
            raise ConfigError(f"{flag} must be positive, got {value!r}")
        return n

    return parse


OPTIONS: list[Option] = [
    Option(
        "record",
        ("--record",),
        "record the traffic as pcapng files in this directory (created if missing); "
        "replay them with `mongoproxy replay`, open them with Wireshark",
        str,
        None,
        metavar="DIR",
        group=G,
    ),
    Option(
        "record_max_bytes",
        ("--record-max-bytes",),
        "start a new file once a file reaches this size, e.g. 500MB",
        parse_size("--record-max-bytes"),
        DEFAULT_MAX_BYTES,
        metavar="N",
        group=G,
    ),
    Option(
        "record_rotate_seconds",
        ("--record-rotate-seconds",),
        "start a new file once a file is this old; 0 rotates by size only",
        non_negative_float("--record-rotate-seconds"),
        DEFAULT_ROTATE_SECONDS,
        metavar="S",
        group=G,
    ),
    Option(
        "record_max_total_bytes",
        ("--record-max-total-bytes",),
        "keep the recordings in the directory under this total, deleting the oldest finished files first "
        "(each file is then at most half of it), e.g. 10GB",
        parse_size("--record-max-total-bytes"),
        None,
        metavar="N",
        group=G,
    ),
    Option(
        "record_max_age",
        ("--record-max-age",),
        "delete finished recordings older than this, e.g. 7d or 12h",
        parse_duration("--record-max-age"),
        None,
        metavar="AGE",
        group=G,
    ),
    Option(
        "record_ns",
        ("--record-ns",),
        "record only commands on these namespaces (db.collection, db.* or db, "
        "comma-separated) and their replies; handshake and auth are always kept",
        ns_list_parser("--record-ns"),
        (),
        metavar="NS",
        group=G,
    ),
    Option(
        "record_redact",
        ("--record-redact",),
        "in the recording only, replace literal values by keyed "
        "hashes of the same type and size (equal values stay equal); the forwarded bytes are untouched",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "record_queue_bytes",
        ("--record-queue-bytes",),
        "memory the recording queue may hold; when the "
        "writer falls further behind, whole connections stop being recorded (counted in "
        "mongoproxy_capture_dropped_total)",
        parse_size("--record-queue-bytes"),
        DEFAULT_QUEUE_BYTES,
        metavar="N",
        group=G,
    ),
]


def create(config: Any, ctx: Any) -> CaptureSink | None:
    """A CaptureSink when --record DIR is given; ConfigError when the directory cannot be used."""
    directory = getattr(config, "record", None)
    if not directory:
        sources = getattr(config, "sources", {})
        given = [o.flag for o in OPTIONS[1:] if sources.get(o.dest, "default") != "default"]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) --record DIR: add --record with a directory to write to")
        return None
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"--record {directory} is a file: give a directory for the recordings")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--record {directory}: cannot create the directory ({exc.strerror}); create it or choose another path"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--record {directory}: the directory is not writable; fix its permissions or choose another path"
        )
    logger = getattr(ctx, "logger", None)
    return CaptureSink(
        directory,
        max_bytes=config.record_max_bytes,
        rotate_seconds=config.record_rotate_seconds,
        namespaces=tuple(config.record_ns or ()),
        pseudonymise=bool(config.record_redact),
        queue_bytes=config.record_queue_bytes,
        registry=getattr(ctx, "registry", None),
        max_message_bytes=getattr(config, "max_message_bytes", 48_000_000),
        logger=logger.getChild("capture") if logger is not None else None,
        max_total_bytes=getattr(config, "record_max_total_bytes", None),
        max_age_seconds=getattr(config, "record_max_age", None),
    )
