# cython: language_level=3
"""The query digest's per-command counting, compiled: the data path's share of mongoproxy.digest.

mongoproxy.digest owns the table (an OrderedDict of Entry, bounded by max_shapes), the sketches and the JSON;
this module holds an Entry's fields in C (EntryBase, which digest.Entry extends with its read-side methods)
and does what each command costs: one key lookup, the LRU move, the counters and one pending sketch bin.
DigestHook is the digest sink's on_command: one C call per command from the SinkBus.
Invariants:
- Only the event loop calls count(); readers flush `pending` into the sketch (digest.Entry.flush).
- The table never holds more than max_shapes keys: past it the least recently seen is evicted and counted.
- It imports nothing from mongoproxy: digest.py hands it the Entry type, the bin-key cache and bin_key().
"""

from libc.stdint cimport int64_t
from mongoproxy.tracker cimport CommandEvent


cdef class EntryBase:
    """One key's aggregates (the fields; mongoproxy.digest.Entry adds the methods)."""


cdef class Counting:
    """Counts commands into a digest.Digest; made once by mongoproxy.digest with its Entry type and bin keys."""

    def __init__(self, entry_type, dict keys not None, bin_key):
        self.entry_type = entry_type  # a subclass of EntryBase, called (example, at_ns) for a new key
        self.keys = keys  # latency ms -> sketch bin key, the cache bin_key() fills
        self.bin_key = bin_key

    def __call__(self, digest, tuple key, example, int64_t at_ns, duration_ms, error, docs_returned,
                 docs_changed, int64_t request_bytes, int64_t reply_bytes):
        """Count one command under `key` (digest.Digest.add)."""
        self.count(digest, key, example, at_ns, duration_ms, error, docs_returned, docs_changed, request_bytes,
                   reply_bytes)

    cdef int count(self, object digest, tuple key, object example, int64_t at_ns, object duration_ms, object error,
                   object docs_returned, object docs_changed, int64_t request_bytes, int64_t reply_bytes) except -1:
        cdef EntryBase e
        cdef double ms
        cdef dict pending
        entries = digest.entries
        found = entries.get(key)
        if found is None:
            e = <EntryBase?>self.entry_type(example, at_ns)
            entries[key] = e
            if len(entries) > digest.max_shapes:
                entries.popitem(last=False)
                digest.evictions += 1
        else:
            entries.move_to_end(key)
            e = <EntryBase>found
            e.last_ns = at_ns
        e.count += 1
        if duration_ms is not None:
            ms = duration_ms
            # Buffered by bin (bounded by the sketch's bin count) and folded into the sketch when read.
            k = self.keys.get(duration_ms)
            if k is None:
                k = self.bin_key(duration_ms)
            pending = e.pending
            pending[k] = pending.get(k, 0) + 1
            e.total_ms += ms
            if ms < e.min_ms:
                e.min_ms = ms
            if ms > e.max_ms:
                e.max_ms = ms
        if error is not None:
            e.errors[error] = e.errors.get(error, 0) + 1
        if docs_returned:
            e.docs_returned += docs_returned
        if docs_changed:
            e.docs_changed += docs_changed
        e.request_bytes += request_bytes
        e.reply_bytes += reply_bytes
        return 0


cdef class DigestHook:
    """The digest sink's on_command: counts every command but drivers' monitoring long polls under its shape."""

    def __init__(self, sink, Counting counting not None, event_query, error_name):
        self.sink = sink  # sinks.digest.DigestSink: its digest, live view and show_values are read per command
        self.counting = counting
        self.event_query = event_query  # querylog.event_query
        self.error_name = error_name  # digest.error_name

    def __call__(self, CommandEvent event not None):
        """Count one command (and offer it to the live view when a browser follows it)."""
        cdef int64_t first, last
        if event.awaitable:
            return
        sink = self.sink
        live = sink.live
        if live is not None and live.subscribers:
            live.offer(event)
        q = self.event_query(event, sink.show_values)
        last = event.reply_last_ns
        first = event.request_first_ns
        self.counting.count(
            sink.digest,
            (q.shape if q is not None else "", event.database, event.collection, event.op,
             event.connection.app_name),
            q.redacted if q is not None else "",
            first,
            ((last - first + 500) // 1000) / 1000.0 if last else None,  # events.duration_ms
            self.error_name(event) if event.is_failed() else None,
            event.documents_returned,
            event.documents_changed,
            event.request_size,
            event.reply_size if last else 0,
        )
