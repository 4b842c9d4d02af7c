# C-level declarations of the tap's per-chunk fast path (mongoproxy._tap).

from libc.stdint cimport int64_t
from mongoproxy.tracker cimport Tracker


cdef class Tap:
    cdef object framer           # the direction's protocol.framing.FrameScanner: everything but whole messages
    cdef Tracker tracker
    cdef object conn             # events.Connection: its byte counters are bumped here
    cdef bint is_reply
    cdef bint fast               # the framer is at a message boundary, holds nothing and checks no checksum
    cdef int render
    cdef Py_ssize_t render_limit
    cdef int64_t max_message_bytes
    cdef readonly int64_t messages  # messages observed by the fast path
    cdef public object after_reply  # called after each reply matched by the fast path, or None

    cdef int _feed(self, data, int64_t now) except -1
    cdef Py_ssize_t _whole(self, data, Py_ssize_t n, int64_t now) except -1
