# C-level declarations of the metrics sink's compiled histograms (mongoproxy.sinks._series).

from libc.stdint cimport int64_t
from mongoproxy.tracker cimport CommandEvent


cdef class Layout:
    cdef double* bounds[5]    # per histogram (H_* order): its bucket bounds
    cdef int nbounds[5]
    cdef int offset[5]        # where each histogram's counts start in a Series' one counts block
    cdef int total            # counts per Series (each histogram's bounds + 1 for +Inf)


cdef class Series:
    cdef Layout layout
    cdef int64_t* counts
    cdef double sums[5]

    cdef inline void _add(self, int h, double v) noexcept
    cdef bint _observe(self, CommandEvent e) except -1


cdef class MetricsHook:
    cdef readonly object sink  # the sink this hook belongs to (SinkBus names it when the hook raises)
    cdef dict cache           # raw label key -> Series
    cdef int nsrc             # labels
    cdef int nitems           # key items (the server label takes two)
    cdef int src[16]          # label source ids (S_*), in the sink's label order

    cdef tuple _key(self, CommandEvent e, object c)
