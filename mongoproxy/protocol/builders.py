"""Messages the proxy itself sends: OP_MSG error and write-error replies, OP_REPLY for requests sent as OP_QUERY.

Every builder returns one complete message (header included) whose
messageLength is exact; tests decode each with pymongo's bson. The proxy
never builds a message that claims to come from a server it did not ask:
these replies answer a request it chose not to forward.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import bson

from mongoproxy.protocol.opcodes import HEADER, OP_MSG, OP_REPLY

_OP_REPLY_PREFIX = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned
QUERY_FAILURE = 1 << 1  # OP_REPLY responseFlags: the one document is {$err, code}

# Real server error codes (src/mongo/base/error_codes.yml) → codeName: the ones drills and drivers care about.
CODE_NAMES: dict[int, str] = {
    1: "InternalError",
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    8: "UnknownError",
    9: "FailedToParse",
    11: "UserNotFound",
    13: "Unauthorized",
    14: "TypeMismatch",
    18: "AuthenticationFailed",
    20: "IllegalOperation",
    24: "LockTimeout",
    26: "NamespaceNotFound",
    28: "PathNotViable",
    40: "ConflictingUpdateOperators",
    43: "CursorNotFound",
    46: "LockBusy",
    48: "NamespaceExists",
    50: "MaxTimeMSExpired",
    52: "DollarPrefixedFieldName",
    53: "InvalidIdField",
    55: "InvalidDBRef",
    56: "EmptyFieldName",
    57: "DottedFieldName",
    59: "CommandNotFound",
    61: "ShardKeyNotFound",
    64: "WriteConcernTimeout",
    66: "ImmutableField",
    79: "UnknownReplWriteConcern",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    96: "OperationFailed",
    100: "UnsatisfiableWriteConcern",
    112: "WriteConflict",
    121: "DocumentValidationFailure",
    133: "FailedToSatisfyReadPreference",
    134: "ReadConcernMajorityNotAvailableYet",
    148: "ReadConcernMajorityNotEnabled",
    175: "QueryPlanKilled",
    189: "PrimarySteppedDown",
    202: "NetworkInterfaceExceededTimeLimit",
    211: "KeyNotFound",
    251: "NoSuchTransaction",
    256: "TransactionCommitted",
    262: "ExceededTimeLimit",
    263: "OperationNotSupportedInTransaction",
    292: "QueryExceededMemoryLimitNoDiskUseAllowed",
    317: "ConnectionPoolExpired",
    9001: "SocketException",
    10003: "CannotGrowDocumentInCappedNamespace",
    10107: "NotWritablePrimary",
    10334: "BSONObjectTooLarge",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11601: "Interrupted",
    11602: "InterruptedDueToReplStateChange",
    12586: "BackgroundOperationInProgressForDatabase",
    13388: "StaleConfig",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    14031: "OutOfDiskSpace",
    16500: "ExceededMemoryLimit",
    50915: "ShardingStateNotInitialized",
}

# Labels a server attaches to errors; drivers act on these (retry a write, retry a transaction).
ERROR_LABELS = frozenset(
    {
        "RetryableWriteError",
        "TransientTransactionError",
        "UnknownTransactionCommitResult",
        "NoWritesPerformed",
        "ResumableChangeStreamError",
        "SystemOverloadedError",
        "RetryableError",
    }
)


def code_name(code: int) -> str:
    """The server's codeName for `code`, or "" when the table does not know it."""
    return CODE_NAMES.get(code, "")


def op_msg(request_id: int, response_to: int, doc: dict) -> bytes:
    """An OP_MSG with flagBits 0 and one kind-0 section holding `doc`."""
    body = b"\x00\x00\x00\x00\x00" + bson.encode(doc)  # flagBits 0, one kind-0 section
    return HEADER.pack(16 + len(body), request_id, response_to, OP_MSG) + body


def _error_doc(code: int, errmsg: str, labels: Iterable[str], name: str | None) -> dict:
    doc: dict = {
        "ok": 0.0,
        "errmsg": errmsg,
        "code": int(code),
        "codeName": name or code_name(code) or f"Location{code}",
    }
    labels = list(labels)
    if labels:
        doc["errorLabels"] = labels
    return doc


def error_reply(
    request_id: int, response_to: int, code: int, errmsg: str, labels: Iterable[str] = (), name: str | None = None
) -> bytes:
    """OP_MSG {ok: 0, errmsg, code, codeName[, errorLabels]} answering request `response_to`."""
    return op_msg(request_id, response_to, _error_doc(code, errmsg, labels, name))


def write_error_reply(request_id: int, response_to: int, code: int, errmsg: str, index: int = 0) -> bytes:
    """OP_MSG {ok: 1, n: 0, writeErrors: [{index, code, errmsg}]}, as a server answers a failed write."""
    entry = {"index": int(index), "code": int(code), "errmsg": errmsg}
    return op_msg(request_id, response_to, {"n": 0, "writeErrors": [entry], "ok": 1.0})


def query_error_reply(
    request_id: int,
    response_to: int,
    code: int,
    errmsg: str,
    labels: Iterable[str] = (),
    command: bool = True,
    name: str | None = None,
) -> bytes:
    """OP_REPLY answering an OP_QUERY: a command gets its {ok: 0, ...} document, a plain query {$err, code}."""
    if command:
        doc = _error_doc(code, errmsg, labels, name)
        flags = 0
    else:
        doc = {"$err": errmsg, "code": int(code)}
        flags = QUERY_FAILURE
    body = _OP_REPLY_PREFIX.pack(flags, 0, 0, 1) + bson.encode(doc)
    return HEADER.pack(16 + len(body), request_id, response_to, OP_REPLY) + body
