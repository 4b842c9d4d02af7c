# C-level declarations of the request/reply tracker: what mongoproxy._tap (the per-chunk fast path) cimports.

from libc.stdint cimport int64_t


cdef class CommandEvent:
    cdef public object connection
    cdef public object op
    cdef public object database
    cdef public object collection
    cdef public int64_t request_id
    cdef public int request_opcode
    cdef public int64_t request_size
    cdef public int64_t request_first_ns
    cdef public int64_t request_last_ns
    cdef public object request
    cdef public int reply_opcode
    cdef public int64_t reply_size
    cdef public int64_t reply_first_ns
    cdef public int64_t reply_last_ns
    cdef public object reply
    cdef public int64_t reply_request_id
    cdef public object ok
    cdef public object code
    cdef public object code_name
    cdef public object errmsg
    cdef public object documents_returned
    cdef public object documents_changed
    cdef public object cursor_id
    cdef public bint more_to_come_request
    cdef public bint exhaust
    cdef public int exhaust_index
    cdef public bint awaitable
    cdef public object decode_error
    cdef public object query_cache
    cdef public object fault
    cdef public bint hello

    cdef bint is_failed(self) except -1  # ok:0, a write error or a write-concern error (the `failed` property)


cdef class Pending:
    cdef public object request
    cdef public object op
    cdef public object database
    cdef public object collection
    cdef public object error
    cdef public int64_t request_id
    cdef public int opcode
    cdef public int wire_opcode
    cdef public int64_t length
    cdef public int64_t first_ns
    cdef public int64_t last_ns
    cdef public bint hello
    cdef public int exhaust_index
    cdef public int64_t last_reply_id
    cdef public int64_t last_reply_ns


cdef class Tracker:
    cdef public object conn
    cdef public object bus
    cdef public Py_ssize_t max_pending
    cdef public dict pending
    cdef public dict exhaust

    # The fast path's entry points: a complete message's header fields and scan result (None when the
    # body could not be scanned, `error` then names the reason).
    cdef int request(self, object result, int opcode, int wire_opcode, int64_t request_id, int64_t length,
                     int64_t first_ns, int64_t last_ns, object error) except -1
    cdef int reply(self, object result, int opcode, int wire_opcode, int64_t request_id, int64_t response_to,
                   int64_t length, int64_t first_ns, int64_t last_ns, object error) except -1
    cdef CommandEvent _event(self, Pending p)
    cdef int _handshake_request(self, object r) except -1
    cdef int _handshake_reply(self, object r) except -1
