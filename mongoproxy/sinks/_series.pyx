# cython: language_level=3
"""The metrics sink's per-command histograms of one label set, updated in C (compiled).

A Series holds five histograms (latency, documents returned, documents changed, request size, reply size)
as non-cumulative bucket counts and sums in C arrays. `observe(event)` reads the CommandEvent's C fields
and bumps them with no Python object made; the scrape turns them into Prometheus families (`snapshot`).
Invariants:
- Only the event loop writes (observe); a scrape in another thread reads with snapshot(). Both hold the
  GIL for their whole call, so a snapshot never sees half an observation.
- Bucket i counts values v with bounds[i-1] < v <= bounds[i] (Prometheus `le`); the last is +Inf.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from mongoproxy.tracker cimport CommandEvent

# Histogram indexes, in the order of metrics._HISTOGRAMS.
cdef enum:
    H_LATENCY = 0
    H_RETURNED = 1
    H_CHANGED = 2
    H_REQUEST = 3
    H_REPLY = 4
    H_COUNT = 5


cdef class Layout:
    """The bucket bounds every Series of one sink shares: latency (seconds), documents, sizes (bytes)."""

    def __cinit__(self, latency, documents, sizes):
        cdef int h, i
        cdef int at = 0
        per = {H_LATENCY: latency, H_RETURNED: documents, H_CHANGED: documents, H_REQUEST: sizes, H_REPLY: sizes}
        for h in range(H_COUNT):
            self.bounds[h] = NULL
        for h in range(H_COUNT):
            values = [float(v) for v in per[h]]
            self.bounds[h] = <double*>PyMem_Malloc(sizeof(double) * (len(values) + 1))
            if self.bounds[h] == NULL:
                raise MemoryError()
            for i in range(len(values)):
                self.bounds[h][i] = values[i]
            self.nbounds[h] = len(values)
            self.offset[h] = at
            at += len(values) + 1
        self.total = at

    def __dealloc__(self):
        cdef int h
        for h in range(H_COUNT):
            PyMem_Free(self.bounds[h])


cdef inline int _bucket(const double* bounds, int n, double v) noexcept:
    # bisect_left: the first bound >= v, or n (+Inf).
    cdef int i = 0
    while i < n and bounds[i] < v:
        i += 1
    return i


cdef class Series:
    """The five per-command histograms of one label set."""

    def __cinit__(self, Layout layout not None):
        cdef int i
        self.layout = layout
        self.counts = <int64_t*>PyMem_Malloc(sizeof(int64_t) * layout.total)
        if self.counts == NULL:
            raise MemoryError()
        for i in range(layout.total):
            self.counts[i] = 0
        for i in range(H_COUNT):
            self.sums[i] = 0.0

    def __dealloc__(self):
        PyMem_Free(self.counts)

    cdef inline void _add(self, int h, double v) noexcept:
        cdef Layout L = self.layout
        self.counts[L.offset[h] + _bucket(L.bounds[h], L.nbounds[h], v)] += 1
        self.sums[h] += v

    def observe(self, CommandEvent e not None):
        """Record one command; True when it failed (ok:0, a write error or a write-concern error)."""
        return self._observe(e)

    cdef bint _observe(self, CommandEvent e) except -1:
        if e.reply_last_ns and not e.more_to_come_request and not e.awaitable:
            self._add(H_LATENCY, (e.reply_last_ns - e.request_first_ns) * 1e-9)
        if not e.exhaust_index:  # a streamed reply shares its request with the first reply
            self._add(H_REQUEST, <double>e.request_size)
        if e.reply_size:
            self._add(H_REPLY, <double>e.reply_size)
        if e.documents_returned is not None:
            self._add(H_RETURNED, <double>e.documents_returned)
        if e.documents_changed is not None:
            self._add(H_CHANGED, <double>e.documents_changed)
        return e.is_failed()

    def snapshot(self, int h):
        """(non-cumulative bucket counts with +Inf last, sum) of histogram h (metrics._HISTOGRAMS order)."""
        cdef Layout L = self.layout
        cdef int i
        if not 0 <= h < H_COUNT:
            raise IndexError(h)
        counts = [self.counts[L.offset[h] + i] for i in range(L.nbounds[h] + 1)]
        total = self.sums[h]
        if h != H_LATENCY:
            total = int(total)  # counts of documents and bytes: an integer sum, as Prometheus shows it
        return counts, total


# Label sources, in the order of metrics.LABEL_SOURCES (the one list of label names and what each reads).
LABELS = ("op", "db", "collection", "app", "server", "replicaset", "member_state", "client")
cdef enum:
    S_OP = 0
    S_DB
    S_COLLECTION
    S_APP
    S_SERVER  # two key items: the upstream host and port (joined into "host:port" once per new key)
    S_REPLICASET
    S_MEMBER_STATE
    S_CLIENT
    S_MAX = 16


cdef class MetricsHook:
    """The metrics sink's on_command: the raw label key built in C, one dict hit, one observe().

    The key is the tuple of the label values in the sink's label order, the server label as two items (host,
    port); sinks.metrics.MetricsSink._resolve caps it and makes the series on first sight.
    """

    def __init__(self, sink, labels, dict cache not None):
        self.sink = sink  # sinks.metrics.MetricsSink: its rare paths (new keys, errors, compression) stay there
        self.cache = cache  # raw label key -> Series, filled by sink._resolve
        names = tuple(labels)
        if len(names) > S_MAX:
            raise ValueError(f"at most {S_MAX} labels")
        self.nsrc = len(names)
        self.nitems = 0
        for i, name in enumerate(names):
            if name not in LABELS:
                raise ValueError(f"unknown metric label {name!r}")
            self.src[i] = LABELS.index(name)
            self.nitems += 2 if self.src[i] == S_SERVER else 1

    cdef tuple _key(self, CommandEvent e, object c):
        cdef tuple key = PyTuple_New(self.nitems)
        cdef int i
        cdef Py_ssize_t at = 0
        cdef object v
        for i in range(self.nsrc):
            k = self.src[i]
            if k == S_OP:
                v = e.op
            elif k == S_DB:
                v = e.database
            elif k == S_COLLECTION:
                v = e.collection
            elif k == S_APP:
                v = c.app_name
            elif k == S_SERVER:
                v = c.upstream_host
                Py_INCREF(v)
                PyTuple_SET_ITEM(key, at, v)
                at += 1
                v = c.upstream_port
            elif k == S_REPLICASET:
                v = c.replica_set
            elif k == S_MEMBER_STATE:
                v = c.member_state
            else:
                v = c.client_host
            Py_INCREF(v)
            PyTuple_SET_ITEM(key, at, v)
            at += 1
        return key

    def __call__(self, CommandEvent event not None):
        """Record one command in its label set's histograms; count its failure and the handshake's compressor."""
        sink = self.sink
        conn = event.connection
        if sink._connect_pending:  # a client sends nothing before its upstream is connected
            sink.connect_observed(conn)
        key = self._key(event, conn)
        s = self.cache.get(key)
        if s is None:
            s = sink._resolve(key)
        if (<Series>s)._observe(event):  # ok:0, a write error or a write-concern error
            sink._count_errors(event)
        if event.hello and event.reply is not None:  # the reply carries the negotiated compressor
            sink._count_compression(conn)
