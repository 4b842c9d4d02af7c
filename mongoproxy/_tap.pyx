# cython: language_level=3
"""One direction of one connection, observed in one C call per forwarded chunk: the tap's fast path.

`Tap.feed(chunk)` counts the chunk's bytes, reads the clock, and for every whole message inside the
chunk (header and body, an opcode the scanner reads) parses the header, scans the body in place with
the BodyScanner and hands the result to the Tracker's C API; the tracker calls Python once per
completed command (the event to the sinks). Anything else goes to the direction's FrameScanner
(protocol.framing), the one framer, which handles what the fast path does not: a header split across
chunks, a body that spans chunks, OP_COMPRESSED, checksums (--verify-checksums), bad lengths.

Invariants:
- The fast path runs only while the FrameScanner is at a message boundary holding nothing, and hands it
  the rest of the chunk from the first message it does not take, so the two never both own a message.
- feed() never raises: a bug here is an `internal_error` decode error (logged at WARNING once a minute
  per place) and observation of the direction stops; forwarding is the caller's and has already happened.
- Outcomes equal the FrameScanner's for the same bytes, whatever the chunking: the same events, the same
  decode errors in the same order (tests/unit/test_tap.py checks it on random chunkings).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint32_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from mongoproxy._bson_parser cimport BodyScanner
from mongoproxy.tracker cimport Tracker

from mongoproxy.errors import DecodeError
from mongoproxy.protocol.framing import log_internal_error

# The body scanner that whole messages are scanned with: a scan starts and ends inside one feed() call
# without calling out, so one per process serves every connection; `_busy` covers a scan reached
# re-entrantly from another thread (a finalizer run by the garbage collector), which gets its own.
cdef BodyScanner _shared = BodyScanner()
cdef bint _busy = False


cdef inline int64_t _now() noexcept:
    # time.monotonic_ns(): CPython reads the same clock.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int32_t _i32(const unsigned char* p) noexcept:
    return <int32_t>(<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24))


cdef inline bint _body_opcode(int32_t opcode) noexcept:
    # protocol.opcodes.BODY_OPCODES: every opcode but OP_COMPRESSED (2012).
    return opcode == 2013 or opcode == 1 or opcode == 2004 or (2001 <= opcode <= 2011 and opcode != 2003
                                                               and opcode != 2008 and opcode != 2009)


cdef class Tap:
    """Observes one direction of one connection; feed() takes each forwarded chunk."""

    def __init__(self, framer, Tracker tracker not None, conn, bint is_reply):
        self.framer = framer
        self.tracker = tracker
        self.conn = conn
        self.is_reply = is_reply
        self.render = framer.render
        self.render_limit = framer.render_limit
        self.max_message_bytes = framer.max_message_bytes
        self.fast = framer.at_boundary
        self.messages = 0
        self.after_reply = None  # called after each reply matched here (the drain's idle check), or None

    def feed(self, data):
        """Count, time and observe one forwarded chunk. Never raises."""
        self._feed(data, _now())

    def feed_at(self, data, int64_t now_ns):
        """feed() with the chunk's time given (recordings, tests)."""
        self._feed(data, now_ns)

    cdef int _feed(self, data, int64_t now) except -1:
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t pos = 0
        conn = self.conn
        if self.is_reply:
            conn.bytes_from_server += n
        else:
            conn.bytes_from_client += n
        try:
            if self.fast and PyBytes_CheckExact(data):
                pos = self._whole(data, n, now)
                if pos == n:
                    return 0
            framer = self.framer
            framer.feed(data, now, pos)
            self.fast = framer.at_boundary
        except Exception as exc:  # a bug of ours must not reach the data path
            self.fast = False
            self.framer.stop()
            log_internal_error(exc)
            self.framer.on_error("internal_error", repr(exc), True)
        return 0

    cdef Py_ssize_t _whole(self, data, Py_ssize_t n, int64_t now) except -1:
        # Observe the whole messages at the start of the chunk; return where the first other one starts.
        global _busy
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t pos = 0
        cdef int32_t length, request_id, response_to, opcode
        cdef BodyScanner scanner
        cdef bint own
        while n - pos >= 16:
            length = _i32(p + pos)
            request_id = _i32(p + pos + 4)
            response_to = _i32(p + pos + 8)
            opcode = _i32(p + pos + 12)
            if not (16 < length <= n - pos and length <= self.max_message_bytes and _body_opcode(opcode)):
                break
            result = None
            failure = None
            own = not _busy
            scanner = _shared if own else BodyScanner()
            _busy = True
            try:
                scanner._reset(opcode, self.is_reply, length - 16, self.render, self.render_limit)
                scanner._feed(p, PyBytes_GET_SIZE(data), pos + 16, pos + length)
                if scanner.done:
                    result = scanner.res
                else:
                    failure = DecodeError("truncated", "message ended inside its body")
            except DecodeError as exc:
                failure = exc
            finally:
                if own:
                    _busy = False
            error = ""
            if failure is not None:
                error = failure.reason
                self.framer.on_error(failure.reason, failure.detail, False)
            pos += length
            self.messages += 1
            if self.is_reply:
                self.tracker.reply(result, opcode, opcode, request_id, response_to, length, now, now, error)
                if self.after_reply is not None:
                    self.after_reply()
            else:
                self.tracker.request(result, opcode, opcode, request_id, length, now, now, error)
        return pos
