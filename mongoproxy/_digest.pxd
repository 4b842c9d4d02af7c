# C-level declarations of the query digest's compiled per-command counting (mongoproxy._digest).

from libc.stdint cimport int64_t


cdef class EntryBase:
    cdef public int64_t count
    cdef public dict errors
    cdef public object sketch
    cdef public double min_ms
    cdef public double max_ms
    cdef public double total_ms
    cdef public int64_t docs_returned
    cdef public int64_t docs_changed
    cdef public int64_t request_bytes
    cdef public int64_t reply_bytes
    cdef public int64_t first_ns
    cdef public int64_t last_ns
    cdef public object example
    cdef public dict pending
    cdef public object cached


cdef class Counting:
    cdef object entry_type
    cdef dict keys
    cdef object bin_key

    cdef int count(self, object digest, tuple key, object example, int64_t at_ns, object duration_ms, object error,
                   object docs_returned, object docs_changed, int64_t request_bytes, int64_t reply_bytes) except -1


cdef class DigestHook:
    cdef readonly object sink  # the sink this hook belongs to (SinkBus names it when the hook raises)
    cdef Counting counting
    cdef object event_query
    cdef object error_name
