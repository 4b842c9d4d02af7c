# C-level declarations of the incremental, selective message-body scanner.

from libc.stdint cimport int64_t


cdef enum:
    STACK_MAX = 112      # frames; spec paths need < 10, rendering stops at RENDER_DEPTH
    STACK_INLINE = 12    # frames held inline; deeper (rendered) documents grow the stack to STACK_MAX on demand
    RENDER_DEPTH = 100   # deepest rendered document nesting
    KEY_MAX = 64         # longer keys cannot match a spec key; they are only scanned to their NUL
    ACC_MAX = 16         # widest fixed-size value read through the accumulator (decimal128)
    STRLIST_MAX = 16     # entries kept of a `compression` array


# A path trie: a node lists the keys it cares about; everything else is skipped by length.
cdef struct SpecNode


cdef struct SpecChild:
    const char* key
    int keylen
    unsigned int accept  # bit per BSON type captured as a scalar into `field`
    int field            # scalar field id, or -1
    int count_field      # element-count field id for arrays, or -1
    int flags            # CF_* bits
    SpecNode* node       # descend into documents/arrays with this node, or NULL


cdef struct SpecNode:
    int nchildren
    unsigned long long lengths  # bit n set when some child key is n bytes long
    SpecChild* children


cdef struct Frame:
    int64_t end            # absolute body offset one past the document's terminator
    const SpecNode* node   # NULL: nothing below is on a spec path
    int64_t count          # elements seen so far
    int count_field        # field receiving `count` when the frame pops, or -1
    int flags              # FL_* bits


cdef struct Step:
    int kind
    int arg


cdef class ScanResult:
    cdef public int opcode
    cdef public unsigned int flags
    cdef public object checksum
    cdef public object command
    cdef public object collection
    cdef public object database
    cdef public object namespace
    cdef public object cursor_id
    cdef public object comment
    cdef public object comment_traceparent
    cdef public object comment_tracestate
    cdef public object app_name
    cdef public object driver_name
    cdef public object driver_version
    cdef public object compression
    cdef public long long documents
    cdef public object query_shape
    cdef public object ok
    cdef public object code
    cdef public object code_name
    cdef public object errmsg
    cdef public object cursor_ns
    cdef public object returned
    cdef public object n
    cdef public object n_modified
    cdef public object upserted
    cdef public object write_errors
    cdef public object write_error_code
    cdef public object write_error_code_name
    cdef public object write_concern_error_code
    cdef public object write_concern_error_code_name
    cdef public object last_error_n
    cdef public object set_name
    cdef public object me
    cdef public object max_wire_version

    cdef ScanResult _copy(self)


cdef class BodyScanner:
    cdef readonly bint done
    cdef readonly int64_t consumed

    # message
    cdef int64_t body_length
    cdef int opcode
    cdef bint is_reply
    cdef int state
    cdef const Step* prog
    cdef int step
    cdef ScanResult res
    cdef object legacy_comment
    cdef int error_reason

    # document stack: `stack` points at `stack_inline` until a document nests deeper than STACK_INLINE,
    # then at a heap block of STACK_MAX frames, given back at the next reset (an idle scanner holds none)
    cdef Frame* stack
    cdef Frame stack_inline[STACK_INLINE]
    cdef int stack_cap
    cdef int depth

    # current element
    cdef int etype
    cdef const SpecChild* cur
    cdef bint vsecret      # the current value is a secret: render "?"
    cdef int vrmode        # render mode for the current value (0 off, 1 redacted, 2 values)
    cdef int64_t vstart    # absolute offset of the current value's length prefix
    cdef int fixed_len
    cdef bint fixed_cap
    cdef bint fixed_render

    # key accumulator, used only for keys split across chunks (first KEY_MAX bytes)
    cdef unsigned char keybuf[KEY_MAX]
    cdef int64_t key_total

    # string capture
    cdef unsigned char* cap
    cdef Py_ssize_t max_string
    cdef Py_ssize_t cap_len
    cdef Py_ssize_t cap_max
    cdef int64_t str_total
    cdef int64_t str_left
    cdef bint str_capture
    cdef bint str_render
    cdef int cstr_left
    cdef int strlist_n

    # fixed-size accumulator for values split across chunks
    cdef unsigned char acc[ACC_MAX]
    cdef int acc_len

    # skipping
    cdef int64_t skip_left
    cdef int after_skip
    cdef int after_nul
    cdef int nul_reason

    # top-level documents and sequences
    cdef int64_t root_limit
    cdef const SpecNode* root_node
    cdef int root_flags
    cdef int root_short_reason
    cdef int after_doc
    cdef int64_t seq_end
    cdef int64_t seq_left
    cdef int64_t seq_count
    cdef bint seq_count_docs
    cdef const SpecNode* seq_first_node  # spec for the sequence's first document, or NULL: skip it
    cdef int seq_first_flags
    cdef int seq_short_reason
    cdef int seq_next
    cdef int64_t post_skip
    cdef int layout_arg    # L_* code of the layout int being read, or the field of a layout cstring

    # OP_MSG / legacy layout
    cdef int64_t sections_end
    cdef int64_t section_end
    cdef bint has_checksum
    cdef bint body_seen
    cdef bint query_is_cmd
    cdef int64_t n_returned
    cdef int64_t n_cursors

    # rendering
    cdef int render
    cdef Py_ssize_t render_limit
    cdef char* rbuf        # the region being rendered into: rmem, or the statement region while one renders
    # rmem: the command document's region of render_limit + 8 bytes, then (once one was seen) the statement's
    cdef char* rmem
    cdef Py_ssize_t rcap
    cdef Py_ssize_t rlen
    cdef bint rfull
    cdef bint rsecret_all
    cdef int64_t rstr_n
    cdef bint rstr_done
    # the first statement of a kind-1 `updates`/`deletes` sequence, rendered into the second region
    cdef Py_ssize_t rstmt_len   # its rendered length, or -1: none rendered yet
    cdef bint rstmt_full        # it was cut at render_limit
    cdef bint rstmt_deletes     # it came from `deletes` (else `updates`)
    cdef Py_ssize_t rsave_len   # the command region's rlen/rfull, kept while the statement renders
    cdef bint rsave_full

    cdef int _reset(self, int opcode, bint is_reply, int64_t body_length, int render,
                    Py_ssize_t render_limit) except -1
    cdef int _feed(self, const unsigned char* p, Py_ssize_t size, Py_ssize_t start, Py_ssize_t end) except -1
    cdef int _run(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _fail(self, int reason, int64_t pos) except -1
    cdef int _next_step(self) except -1
    cdef int _begin_step(self, int64_t pos) except -1
    cdef int _layout_fixed(self, const unsigned char* v, int64_t pos) except -1
    cdef int _layout_cstring(self, int field) except -1
    cdef int _begin_doc(
        self, int64_t pos, int64_t limit, const SpecNode* node, int flags, int after, int short_reason
    ) except -1
    cdef int _root_len(self, int64_t length, int64_t pos) except -1
    cdef int _push(self, int64_t end, const SpecNode* node, int count_field, int flags) except -1
    cdef int _pop(self) except -1
    cdef int _key_piece(self, const unsigned char* s, Py_ssize_t k) except -1
    cdef void _ident_piece(self, const unsigned char* s, Py_ssize_t k) noexcept
    cdef void _seq_ident_done(self, const unsigned char* s, Py_ssize_t k) noexcept
    cdef int _key_done(self, const unsigned char* key, const unsigned char* first) except -1
    cdef int _dispatch(self, int64_t pos) except -1
    cdef int _value_len(self, int64_t length) except -1
    cdef int _store_str(self, int field, const unsigned char* s, Py_ssize_t have, int64_t total,
                        bint first_wins) except -1
    cdef int _store_num(self, const SpecChild* c, int t, const unsigned char* v) except -1
    cdef int _set_count(self, int field, int64_t count, bint add) except -1
    cdef object _decode_cut(self, const unsigned char* s, Py_ssize_t have, int64_t total)
    cdef int _finish(self) except -1

    # rendering helpers (no-ops once the buffer is full)
    cdef void _remit(self, const char* s, Py_ssize_t k) noexcept
    cdef void _remit_escaped(self, const unsigned char* s, Py_ssize_t k) noexcept
    cdef void _rstr_piece(self, const unsigned char* s, Py_ssize_t k) noexcept
    cdef void _render_fixed(self, int t, const unsigned char* v) noexcept
    cdef int _rreserve(self, Py_ssize_t cap) except -1
    cdef void _rtruncate(self) noexcept
    cdef object _shape(self)
