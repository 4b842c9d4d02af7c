# cython: language_level=3
"""Incremental, selective scanner for one MongoDB message body.

The caller (mongoproxy.protocol.framing) parses the 16-byte header, undoes OP_COMPRESSED,
then calls ``BodyScanner.reset(opcode, is_reply, body_length)`` and
``feed(chunk)`` until ``done``. The scanner never buffers a message or a
document: it keeps O(1) state, reads in place when a field lies within one
chunk and copies only across chunk boundaries into small fixed accumulators.
Anything not on a path of the field spec (a trie built once at import) is
skipped by its length prefix without descending.

Decode-error reasons (``DecodeError.reason``; a fixed vocabulary, used as
Prometheus label values, also exported as ``DECODE_REASONS``):

  unknown_opcode         reset() with an op code this scanner does not know
  truncated              the body ends inside a fixed field, a header cstring,
                         or before the declared number of documents / cursor ids
  trailing_bytes         bytes remain after a fixed-layout body is complete
  bad_length             a document, string, binary or section length is out of
                         range or runs past its container
  missing_terminator     a document's declared last byte is not 0x00, or a 0x00
                         type byte comes before the declared end
  string_not_terminated  a string length < 1 or its last byte not NUL; a key,
                         regex or section identifier without NUL in its container
  unknown_type           an element type byte outside the BSON spec
  bad_section_kind       an OP_MSG section kind other than 0 or 1
  invalid_utf8           a captured string (or the command name) is not UTF-8

Rules worth knowing:
  * ``command`` is the first key of the command document. Its value, when a
    string, is ``collection``; for ``getMore`` an int32/int64 value is
    ``cursor_id``. A root ``collection`` string applies only when the first
    value was not a string.
  * ``comment`` is the root string ``comment``; otherwise the first legacy
    ``$comment`` string found in body order (filter / q / query /
    pipeline.0.$match / updates.0.q / deletes.0.q; the ``q.$comment`` of the
    first document of an OP_MSG request's kind-1 ``updates``/``deletes``
    sequence; OP_QUERY: ``$comment`` and ``$query.$comment``). The root string
    wins whatever the section order.
  * OP_REPLY: ``returned`` and ``cursor_id`` come from the header unless the
    first document carries ``cursor.firstBatch``/``nextBatch`` / ``cursor.id``,
    which then win (they describe a command reply more precisely).
  * OP_COMMAND (2010): cstring database, cstring commandName, commandArgs,
    metadata, inputDocs (counted into ``documents``). OP_COMMANDREPLY (2011):
    commandReply, metadata, outputDocs. (The server's order; some old manual
    pages list metadata first.)
  * Captured strings are cut to ``max_string`` bytes at a UTF-8 character
    boundary; ``compression`` keeps the first 16 string entries.
  * OP_MSG: the first kind-0 section is scanned; further kind-0 sections are
    only validated. Kind-1 documents are counted and skipped by length, except
    the first of a request's ``updates``/``deletes`` sequence, where
    ``q.$comment`` is read (and which renders, see below). The CRC-32C is exposed, not verified.

Rendering (reset(render=RENDER_REDACTED|RENDER_VALUES)) descends the whole
command document into a bounded buffer (``query_shape``). The first document of
a request's first kind-1 ``updates``/``deletes`` sequence renders into a second
region of the same size (allocated on the first such statement) and is spliced
in at the end as ``"updates":[{...}]`` (the kind-0 form of a one-statement
command), whatever the section order; other kind-1 documents (inserted
``documents`` among them) never render. Secrets (``payload``, ``pwd``,
``speculativeAuthenticate``, all of ``authenticate``) are always "?".
Past ``render_limit`` bytes or 100 levels it ends with "…" and stops rendering.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.list cimport PyList_GET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport malloc, strtod
from libc.string cimport memchr, memcmp, memcpy

cimport cython

from mongoproxy.errors import DecodeError

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMMAND = 2010
OP_COMMANDREPLY = 2011
OP_MSG = 2013

MAX_STRING = 512
RENDER_OFF = 0
RENDER_REDACTED = 1
RENDER_VALUES = 2
RENDER_STRING_MAX = 128  # rendered string values are cut here (RENDER_VALUES)

DECODE_REASONS = (
    "unknown_opcode",
    "truncated",
    "trailing_bytes",
    "bad_length",
    "missing_terminator",
    "string_not_terminated",
    "unknown_type",
    "bad_section_kind",
    "invalid_utf8",
)

cdef enum:
    R_UNKNOWN_OPCODE = 0
    R_TRUNCATED
    R_TRAILING
    R_BAD_LENGTH
    R_MISSING_TERM
    R_STR_NOT_TERM
    R_UNKNOWN_TYPE
    R_BAD_SECTION
    R_INVALID_UTF8

cdef enum:
    C_OP_REPLY = 1
    C_OP_UPDATE = 2001
    C_OP_INSERT = 2002
    C_OP_QUERY = 2004
    C_OP_GET_MORE = 2005
    C_OP_DELETE = 2006
    C_OP_KILL_CURSORS = 2007
    C_OP_COMMAND = 2010
    C_OP_COMMANDREPLY = 2011
    C_OP_MSG = 2013

# Result fields.
cdef enum:
    F_COMMAND = 0
    F_COLLECTION
    F_DATABASE
    F_NAMESPACE
    F_COMMENT
    F_LEGACY_COMMENT
    F_TRACEPARENT
    F_TRACESTATE
    F_APP_NAME
    F_DRIVER_NAME
    F_DRIVER_VERSION
    F_COMPRESSION
    F_STRITEM
    F_CODE_NAME
    F_ERRMSG
    F_CURSOR_NS
    F_WE_CODE_NAME
    F_WCE_CODE_NAME
    F_SET_NAME
    F_ME
    F_CURSOR_ID
    F_OK
    F_CODE
    F_RETURNED
    F_N
    F_N_MODIFIED
    F_UPSERTED
    F_WRITE_ERRORS
    F_WE_CODE
    F_WCE_CODE
    F_LAST_ERROR_N
    F_MAX_WIRE
    F_DOCUMENTS

# Names that recur message after message (command, database, collection, code names, the handshake's
# identifiers) are decoded once and the same str object is handed out again: no allocation per message, and
# the str's hash, cached on the object, is not recomputed by the dicts that sinks key on them. A direct-mapped
# table of STR_SLOTS entries, one process-wide (the GIL guards it); a colliding name replaces the slot's.
# Only whole strings of at most STR_CACHE_MAX bytes are cached; user data (comments, errmsg) never is.
cdef enum:
    STR_SLOTS = 512
    STR_CACHE_MAX = 64
cdef list _names = [None] * STR_SLOTS
# 1 for the fields whose values are names (low cardinality), indexed by F_* field id.
cdef unsigned long long NAME_FIELDS = (
    (1ULL << F_COMMAND) | (1ULL << F_COLLECTION) | (1ULL << F_DATABASE) | (1ULL << F_APP_NAME)
    | (1ULL << F_DRIVER_NAME) | (1ULL << F_DRIVER_VERSION) | (1ULL << F_STRITEM) | (1ULL << F_CODE_NAME)
    | (1ULL << F_CURSOR_NS) | (1ULL << F_WE_CODE_NAME) | (1ULL << F_WCE_CODE_NAME) | (1ULL << F_SET_NAME)
    | (1ULL << F_ME)
)


cdef object _name(const unsigned char* s, Py_ssize_t n):
    """The str of the UTF-8 name s[:n] (n <= STR_CACHE_MAX), from the table when it is there; raises on bad UTF-8."""
    cdef uint32_t h = 2166136261u  # FNV-1a
    cdef Py_ssize_t i, m
    cdef const char* u
    for i in range(n):
        h = (h ^ s[i]) * 16777619u
    cdef Py_ssize_t slot = h & (STR_SLOTS - 1)
    cdef object cand = <object>PyList_GET_ITEM(_names, slot)
    if cand is not None:
        u = PyUnicode_AsUTF8AndSize(cand, &m)
        if m == n and memcmp(u, s, n) == 0:
            return cand
    val = PyUnicode_DecodeUTF8(<char*>s, n, NULL)
    _names[slot] = val
    return val


# SpecChild.flags
cdef enum:
    CF_FIRST_WINS = 1    # keep the first value captured into the field
    CF_ADD = 2           # the element count adds to the field
    CF_STRLIST = 4       # array of strings collected into a list
    CF_SHOW = 8          # RENDER_REDACTED still shows this string (a namespace, not data)
    CF_ENTER_FIRST = 16  # the child document's first key is the command name
    CF_FLOAT = 32        # number captured as float

# Frame.flags
cdef enum:
    FL_FIRST = 1
    FL_ARRAY = 2
    FL_STRLIST = 4
    FL_RENDER = 8
    FL_ADD = 16
    FL_STMT = 32   # root frame of a rendered kind-1 write statement: it renders into the statement region

# Layout program steps.
cdef enum:
    K_I32 = 1
    K_I64
    K_CSTR
    K_DOC
    K_SKIPDOC
    K_OPTDOC
    K_DOCS
    K_REPLY_DOCS
    K_KILL_IDS
    K_MSG_SECTIONS
    K_END

cdef enum:
    L_IGNORE = 0
    L_FLAGS
    L_MSG_FLAGS
    L_CURSOR
    L_NRETURNED
    L_NCURSORS
    L_CHECKSUM
    L_SEQ_SIZE

cdef enum:
    D_REQUEST = 0
    D_REPLY
    D_QUERY

cdef enum:
    ST_DONE = 0
    ST_ERROR
    ST_STEP
    ST_LFIXED
    ST_LCSTR
    ST_MSG_SECTION
    ST_SEQ_IDENT
    ST_SEQ
    ST_ROOT_LEN
    ST_TYPE
    ST_KEY
    ST_VLEN
    ST_VFIXED
    ST_STR
    ST_NUL
    ST_SKIP
    ST_CSTR

cdef enum:
    A_STR = 1 << 0x02
    A_INT = (1 << 0x10) | (1 << 0x12)
    A_NUM = (1 << 0x10) | (1 << 0x12) | (1 << 0x01) | (1 << 0x08)

cdef enum:
    RSTR_MAX = 128

# Per type byte: 1 when valid; fixed value size or -1 (length-prefixed / regex).
cdef unsigned char TYPE_OK[256]
cdef signed char FIXED_SIZE[256]


cdef void _init_types() noexcept:
    cdef int t
    for t in range(256):
        TYPE_OK[t] = 0
        FIXED_SIZE[t] = -1
    for t in range(0x01, 0x14):
        TYPE_OK[t] = 1
    TYPE_OK[0x7F] = 1
    TYPE_OK[0xFF] = 1
    FIXED_SIZE[0x01] = 8
    FIXED_SIZE[0x06] = 0
    FIXED_SIZE[0x07] = 12
    FIXED_SIZE[0x08] = 1
    FIXED_SIZE[0x09] = 8
    FIXED_SIZE[0x0A] = 0
    FIXED_SIZE[0x10] = 4
    FIXED_SIZE[0x11] = 8
    FIXED_SIZE[0x12] = 8
    FIXED_SIZE[0x13] = 16
    FIXED_SIZE[0x7F] = 0
    FIXED_SIZE[0xFF] = 0


_init_types()


cdef inline uint32_t _u32(const unsigned char* v) noexcept nogil:
    return <uint32_t>v[0] | (<uint32_t>v[1] << 8) | (<uint32_t>v[2] << 16) | (<uint32_t>v[3] << 24)


cdef inline uint64_t _u64(const unsigned char* v) noexcept nogil:
    return <uint64_t>_u32(v) | (<uint64_t>_u32(v + 4) << 32)


cdef inline double _f64(const unsigned char* v) noexcept nogil:
    cdef uint64_t u = _u64(v)
    cdef double d
    memcpy(&d, &u, 8)
    return d


# ---------------------------------------------------------------------------
# The field spec: two path tries (request, reply) plus a few fixed pseudo-children.

# (key, accept, field, count_field, flags, children)
_LEGACY_COMMENT = [("$comment", A_STR, F_LEGACY_COMMENT, -1, CF_FIRST_WINS, None)]

_REQUEST_SPEC = [
    ("collection", A_STR, F_COLLECTION, -1, CF_FIRST_WINS | CF_SHOW, None),
    ("$db", A_STR, F_DATABASE, -1, CF_SHOW, None),
    ("comment", A_STR, F_COMMENT, -1, 0, [
        ("traceparent", A_STR, F_TRACEPARENT, -1, 0, None),
        ("tracestate", A_STR, F_TRACESTATE, -1, 0, None),
    ]),
    ("filter", 0, -1, -1, 0, _LEGACY_COMMENT),
    ("q", 0, -1, -1, 0, _LEGACY_COMMENT),
    ("query", 0, -1, -1, 0, _LEGACY_COMMENT),
    ("pipeline", 0, -1, -1, 0, [("0", 0, -1, -1, 0, [("$match", 0, -1, -1, 0, _LEGACY_COMMENT)])]),
    ("documents", 0, -1, F_DOCUMENTS, CF_ADD, None),
    ("updates", 0, -1, F_DOCUMENTS, CF_ADD, [("0", 0, -1, -1, 0, [("q", 0, -1, -1, 0, _LEGACY_COMMENT)])]),
    ("deletes", 0, -1, F_DOCUMENTS, CF_ADD, [("0", 0, -1, -1, 0, [("q", 0, -1, -1, 0, _LEGACY_COMMENT)])]),
    ("client", 0, -1, -1, 0, [
        ("application", 0, -1, -1, 0, [("name", A_STR, F_APP_NAME, -1, 0, None)]),
        ("driver", 0, -1, -1, 0, [
            ("name", A_STR, F_DRIVER_NAME, -1, 0, None),
            ("version", A_STR, F_DRIVER_VERSION, -1, 0, None),
        ]),
    ]),
    ("compression", 0, -1, -1, CF_STRLIST, None),
    ("cursors", 0, -1, -1, 0, [("0", A_INT, F_CURSOR_ID, -1, 0, None)]),
]

_LEGACY_QUERY_SPEC = [
    ("$comment", A_STR, F_LEGACY_COMMENT, -1, CF_FIRST_WINS, None),
    ("$query", 0, -1, -1, 0, _LEGACY_COMMENT),
]

_CODE_PAIR = [
    ("code", A_NUM, F_WE_CODE, -1, 0, None),
    ("codeName", A_STR, F_WE_CODE_NAME, -1, 0, None),
]

_REPLY_SPEC = [
    ("ok", A_NUM, F_OK, -1, CF_FLOAT, None),
    ("code", A_NUM, F_CODE, -1, 0, None),
    ("codeName", A_STR, F_CODE_NAME, -1, 0, None),
    ("errmsg", A_STR, F_ERRMSG, -1, 0, None),
    ("cursor", 0, -1, -1, 0, [
        ("id", A_INT, F_CURSOR_ID, -1, 0, None),
        ("ns", A_STR, F_CURSOR_NS, -1, 0, None),
        ("firstBatch", 0, -1, F_RETURNED, 0, None),
        ("nextBatch", 0, -1, F_RETURNED, 0, None),
    ]),
    ("n", A_NUM, F_N, -1, 0, None),
    ("nModified", A_NUM, F_N_MODIFIED, -1, 0, None),
    ("upserted", 0, -1, F_UPSERTED, 0, None),
    ("writeErrors", 0, -1, F_WRITE_ERRORS, 0, [("0", 0, -1, -1, 0, _CODE_PAIR)]),
    ("writeConcernError", 0, -1, -1, 0, [
        ("code", A_NUM, F_WCE_CODE, -1, 0, None),
        ("codeName", A_STR, F_WCE_CODE_NAME, -1, 0, None),
    ]),
    ("lastErrorObject", 0, -1, -1, 0, [("n", A_NUM, F_LAST_ERROR_N, -1, 0, None)]),
    ("setName", A_STR, F_SET_NAME, -1, 0, None),
    ("me", A_STR, F_ME, -1, 0, None),
    ("maxWireVersion", A_NUM, F_MAX_WIRE, -1, 0, None),
    ("compression", 0, -1, -1, CF_STRLIST, None),
]


cdef SpecNode* _build_node(list spec) except NULL:
    """Allocate a trie node (module lifetime) from a spec list."""
    cdef SpecNode* node = <SpecNode*>malloc(sizeof(SpecNode))
    cdef Py_ssize_t count = len(spec)
    cdef SpecChild* ch
    cdef char* key
    cdef bytes kb
    if node == NULL:
        raise MemoryError()
    node.nchildren = <int>count
    node.lengths = 0
    node.children = <SpecChild*>malloc(sizeof(SpecChild) * (count if count else 1))
    if node.children == NULL:
        raise MemoryError()
    for j, (name, accept, field, count_field, flags, sub) in enumerate(spec):
        kb = name.encode()
        assert len(kb) < KEY_MAX
        key = <char*>malloc(len(kb) + 1)
        if key == NULL:
            raise MemoryError()
        memcpy(key, <char*>kb, len(kb) + 1)
        ch = &node.children[j]
        ch.key = key
        ch.keylen = <int>len(kb)
        node.lengths |= 1ULL << ch.keylen
        ch.accept = accept
        ch.field = field
        ch.count_field = count_field
        ch.flags = flags
        ch.node = _build_node(sub) if sub is not None else NULL
    return node


cdef SpecNode* REQ_ROOT = _build_node(_REQUEST_SPEC)
cdef SpecNode* REPLY_ROOT = _build_node(_REPLY_SPEC)
cdef SpecNode* LEGACY_QUERY_ROOT = _build_node(_LEGACY_QUERY_SPEC)
# The first document of a request's kind-1 `updates`/`deletes` sequence: only `q.$comment`.
cdef SpecNode* WRITE_SEQ_ROOT = _build_node([("q", 0, -1, -1, 0, _LEGACY_COMMENT)])

# The first element of a command document, by command name.
cdef SpecChild C_FIRST
cdef SpecChild C_FIRST_GETMORE
cdef SpecChild C_QUERY_WRAP
cdef SpecChild C_STRITEM


cdef void _init_pseudo() noexcept:
    global C_FIRST_GETMORE, C_QUERY_WRAP, C_STRITEM
    C_FIRST.key = NULL
    C_FIRST.keylen = 0
    C_FIRST.accept = A_STR
    C_FIRST.field = F_COLLECTION
    C_FIRST.count_field = -1
    C_FIRST.flags = CF_SHOW
    C_FIRST.node = NULL
    C_FIRST_GETMORE = C_FIRST
    C_FIRST_GETMORE.accept = A_STR | A_INT  # a string is the collection, an integer the cursor id
    C_QUERY_WRAP = C_FIRST
    C_QUERY_WRAP.accept = 0
    C_QUERY_WRAP.field = -1
    C_QUERY_WRAP.flags = CF_ENTER_FIRST
    C_QUERY_WRAP.node = REQ_ROOT
    C_STRITEM = C_FIRST
    C_STRITEM.field = F_STRITEM
    C_STRITEM.flags = 0


_init_pseudo()


# ---------------------------------------------------------------------------
# Layout programs, one per op code.

cdef Step* _build_prog(list steps) except NULL:
    cdef Step* prog = <Step*>malloc(sizeof(Step) * len(steps))
    if prog == NULL:
        raise MemoryError()
    for j, (kind, arg) in enumerate(steps):
        prog[j].kind = kind
        prog[j].arg = arg
    return prog


cdef Step* P_MSG = _build_prog([(K_I32, L_MSG_FLAGS), (K_MSG_SECTIONS, 0), (K_END, 0)])
cdef Step* P_QUERY = _build_prog([
    (K_I32, L_FLAGS), (K_CSTR, F_NAMESPACE), (K_I32, L_IGNORE), (K_I32, L_IGNORE),
    (K_DOC, D_QUERY), (K_OPTDOC, 0), (K_END, 0)])
cdef Step* P_REPLY = _build_prog([
    (K_I32, L_FLAGS), (K_I64, L_CURSOR), (K_I32, L_IGNORE), (K_I32, L_NRETURNED),
    (K_REPLY_DOCS, 0), (K_END, 0)])
cdef Step* P_INSERT = _build_prog([(K_I32, L_FLAGS), (K_CSTR, F_NAMESPACE), (K_DOCS, 1), (K_END, 0)])
cdef Step* P_UPDATE = _build_prog([
    (K_I32, L_IGNORE), (K_CSTR, F_NAMESPACE), (K_I32, L_FLAGS), (K_SKIPDOC, 0), (K_SKIPDOC, 0), (K_END, 0)])
cdef Step* P_DELETE = _build_prog([
    (K_I32, L_IGNORE), (K_CSTR, F_NAMESPACE), (K_I32, L_FLAGS), (K_SKIPDOC, 0), (K_END, 0)])
cdef Step* P_GET_MORE = _build_prog([
    (K_I32, L_IGNORE), (K_CSTR, F_NAMESPACE), (K_I32, L_IGNORE), (K_I64, L_CURSOR), (K_END, 0)])
cdef Step* P_KILL_CURSORS = _build_prog([(K_I32, L_IGNORE), (K_I32, L_NCURSORS), (K_KILL_IDS, 0), (K_END, 0)])
cdef Step* P_COMMAND = _build_prog([
    (K_CSTR, F_DATABASE), (K_CSTR, F_COMMAND), (K_DOC, D_REQUEST), (K_SKIPDOC, 0), (K_DOCS, 1), (K_END, 0)])
cdef Step* P_COMMANDREPLY = _build_prog([(K_DOC, D_REPLY), (K_SKIPDOC, 0), (K_DOCS, 0), (K_END, 0)])


cdef const Step* _prog_for(int opcode) noexcept:
    if opcode == C_OP_MSG:
        return P_MSG
    if opcode == C_OP_QUERY:
        return P_QUERY
    if opcode == C_OP_REPLY:
        return P_REPLY
    if opcode == C_OP_INSERT:
        return P_INSERT
    if opcode == C_OP_UPDATE:
        return P_UPDATE
    if opcode == C_OP_DELETE:
        return P_DELETE
    if opcode == C_OP_GET_MORE:
        return P_GET_MORE
    if opcode == C_OP_KILL_CURSORS:
        return P_KILL_CURSORS
    if opcode == C_OP_COMMAND:
        return P_COMMAND
    if opcode == C_OP_COMMANDREPLY:
        return P_COMMANDREPLY
    return NULL


cdef inline bint _key_is(const unsigned char* key, int64_t klen, const char* lit, int64_t litlen) noexcept:
    return klen == litlen and memcmp(key, lit, litlen) == 0


cdef inline bint _secret_key(const unsigned char* key, int64_t klen) noexcept:
    return (_key_is(key, klen, b"payload", 7) or _key_is(key, klen, b"pwd", 3)
            or _key_is(key, klen, b"speculativeAuthenticate", 23))


cdef inline Py_ssize_t _skim(Frame* f, const unsigned char* p, Py_ssize_t n, Py_ssize_t i,
                             int64_t base) noexcept:
    """Where the states would be after skipping, element by element, the documents and arrays of frame f
    that lie whole in the chunk from i: f must have no spec node and neither render nor capture (a reply's
    batch). It stops at the first element that is not a document or an array, lies partly outside the chunk,
    or is malformed (the key or the value past the frame's end, a bad length, a missing terminator) and
    leaves that element to the states, which judge it exactly as before; f.count counts what it skips."""
    cdef Py_ssize_t lim = <Py_ssize_t>(f.end - 1 - base)  # the frame's terminator, relative to p
    cdef Py_ssize_t stop = n if n < lim else lim
    cdef Py_ssize_t j
    cdef int32_t length
    cdef const unsigned char* q
    while i < stop:
        if p[i] != 0x03 and p[i] != 0x04:
            break
        q = <const unsigned char*>memchr(p + i + 1, 0, stop - i - 1)
        if q == NULL:
            break
        j = q - p + 1
        if j + 4 > stop:
            break
        length = <int32_t>_u32(p + j)
        if length < 5 or length > stop - j or p[j + length - 1] != 0:
            break
        f.count += 1
        i = j + length
    return i


cdef inline const unsigned char* _take(BodyScanner s, const unsigned char* p, Py_ssize_t n,
                                       Py_ssize_t* pi, int k) noexcept:
    """k fixed bytes: in place when the chunk holds them all, else via the accumulator; NULL = need more."""
    cdef Py_ssize_t i = pi[0]
    cdef Py_ssize_t m
    if s.acc_len == 0 and n - i >= k:
        pi[0] = i + k
        return p + i
    m = k - s.acc_len
    if m > n - i:
        m = n - i
    memcpy(s.acc + s.acc_len, p + i, m)
    s.acc_len += <int>m
    pi[0] = i + m
    if s.acc_len == k:
        s.acc_len = 0
        return s.acc
    return NULL


_FIELDS = (
    "opcode", "flags", "checksum", "command", "collection", "database", "namespace", "cursor_id",
    "comment", "comment_traceparent", "comment_tracestate", "app_name", "driver_name",
    "driver_version", "compression", "documents", "query_shape", "ok", "code", "code_name",
    "errmsg", "cursor_ns", "returned", "n", "n_modified", "upserted", "write_errors",
    "write_error_code", "write_error_code_name", "write_concern_error_code",
    "write_concern_error_code_name", "last_error_n", "set_name", "me", "max_wire_version",
)


@cython.no_gc  # holds only str, int, float and a list of str: no reference cycles
cdef class ScanResult:
    """Fields extracted from one message body. Absent fields are None."""

    def __init__(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)

    cdef ScanResult _copy(self):
        cdef ScanResult r = ScanResult.__new__(ScanResult)
        r.opcode = self.opcode
        r.flags = self.flags
        r.checksum = self.checksum
        r.command = self.command
        r.collection = self.collection
        r.database = self.database
        r.namespace = self.namespace
        r.cursor_id = self.cursor_id
        r.comment = self.comment
        r.comment_traceparent = self.comment_traceparent
        r.comment_tracestate = self.comment_tracestate
        r.app_name = self.app_name
        r.driver_name = self.driver_name
        r.driver_version = self.driver_version
        r.compression = list(self.compression) if self.compression is not None else None
        r.documents = self.documents
        r.query_shape = self.query_shape
        r.ok = self.ok
        r.code = self.code
        r.code_name = self.code_name
        r.errmsg = self.errmsg
        r.cursor_ns = self.cursor_ns
        r.returned = self.returned
        r.n = self.n
        r.n_modified = self.n_modified
        r.upserted = self.upserted
        r.write_errors = self.write_errors
        r.write_error_code = self.write_error_code
        r.write_error_code_name = self.write_error_code_name
        r.write_concern_error_code = self.write_concern_error_code
        r.write_concern_error_code_name = self.write_concern_error_code_name
        r.last_error_n = self.last_error_n
        r.set_name = self.set_name
        r.me = self.me
        r.max_wire_version = self.max_wire_version
        return r

    def as_dict(self):
        """All fields as a dict (None for absent ones)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def __repr__(self):
        parts = [f"{name}={getattr(self, name)!r}" for name in _FIELDS
                 if getattr(self, name) is not None and name not in ("flags", "documents")]
        if self.flags:
            parts.append(f"flags={self.flags:#x}")
        if self.documents:
            parts.append(f"documents={self.documents}")
        return f"ScanResult({', '.join(parts)})"


cdef class BodyScanner:
    """Scans one message body at a time, chunk by chunk, with O(1) state."""

    def __cinit__(self, Py_ssize_t max_string=MAX_STRING):
        if max_string < 16 or max_string > 1 << 20:
            raise ValueError("max_string must be between 16 and 1 MiB")
        self.max_string = max_string
        self.cap = <unsigned char*>PyMem_Malloc(max_string + 1 + KEY_MAX)
        if self.cap == NULL:
            raise MemoryError()
        self.rbuf = NULL
        self.rmem = NULL
        self.rcap = 0
        self.stack = self.stack_inline
        self.stack_cap = STACK_INLINE
        self.done = True
        self.state = ST_DONE
        self.res = ScanResult.__new__(ScanResult)

    def __init__(self, max_string: int = MAX_STRING):
        pass

    def __dealloc__(self):
        PyMem_Free(self.cap)
        PyMem_Free(self.rmem)
        if self.stack != self.stack_inline:
            PyMem_Free(self.stack)

    def reset(self, int opcode, bint is_reply, int64_t body_length, int render=RENDER_OFF,
              Py_ssize_t render_limit=4096):
        """Start a new body of `body_length` bytes (everything after the 16-byte header)."""
        self._reset(opcode, is_reply, body_length, render, render_limit)

    def scan(self, data, Py_ssize_t start, Py_ssize_t end, int opcode, bint is_reply, int render=RENDER_OFF,
             Py_ssize_t render_limit=4096):
        """One whole body, data[start:end], in one call: reset + feed + result.

        DecodeError("truncated") when the body ends before its layout does.
        """
        cdef Py_buffer view
        self._reset(opcode, is_reply, end - start, render, render_limit)
        if PyBytes_CheckExact(data):
            self._feed(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), start, end)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._feed(<const unsigned char*>view.buf, view.len, start, end)
            finally:
                PyBuffer_Release(&view)
        if not self.done:
            raise DecodeError("truncated", "message ended inside its body")
        return self.res

    cdef int _reset(self, int opcode, bint is_reply, int64_t body_length, int render,
                    Py_ssize_t render_limit) except -1:
        cdef const Step* prog = _prog_for(opcode)
        self.res = ScanResult.__new__(ScanResult)
        self.res.opcode = opcode
        self.consumed = 0
        if prog == NULL:
            self.done = True
            self.state = ST_ERROR
            self.error_reason = R_UNKNOWN_OPCODE
            raise DecodeError("unknown_opcode", f"op code {opcode}")
        if body_length < 0:
            raise ValueError("body_length must be >= 0")
        if render < 0 or render > 2:  # RENDER_OFF .. RENDER_VALUES
            raise ValueError("render must be RENDER_OFF, RENDER_REDACTED or RENDER_VALUES")
        self.opcode = opcode
        self.is_reply = is_reply
        self.body_length = body_length
        self.prog = prog
        self.step = 0
        self.state = ST_STEP
        self.done = False
        self.depth = 0
        if self.stack != self.stack_inline:
            PyMem_Free(self.stack)
            self.stack = self.stack_inline
            self.stack_cap = STACK_INLINE
        self.acc_len = 0
        self.legacy_comment = None
        self.body_seen = False
        self.query_is_cmd = False
        self.has_checksum = False
        self.post_skip = 0
        self.n_returned = 0
        self.n_cursors = 0
        self.seq_count = 0
        self.rsecret_all = False
        self.render = render
        self.rlen = 0
        self.rfull = False
        self.rstmt_len = -1
        self.rbuf = self.rmem
        if render:
            if render_limit < 16:
                raise ValueError("render_limit must be >= 16")
            self.render_limit = render_limit
            self._rreserve(render_limit + 8)
        return 0

    def feed(self, data, Py_ssize_t start=0, Py_ssize_t end=-1):
        """Consume data[start:end] up to the body's end; return the bytes consumed."""
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef Py_ssize_t size
        cdef int64_t before = self.consumed
        if self.state == ST_ERROR:
            raise DecodeError(DECODE_REASONS[self.error_reason], "scanner failed earlier; reset() first")
        if self.done:
            return 0
        if PyBytes_CheckExact(data):
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            size = PyBytes_GET_SIZE(data)
            self._feed(p, size, start, end)
            return self.consumed - before
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const unsigned char*>view.buf, view.len, start, end)
        finally:
            PyBuffer_Release(&view)
        return self.consumed - before

    cdef int _feed(self, const unsigned char* p, Py_ssize_t size, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef int64_t remaining
        cdef Py_ssize_t n
        if end < 0:
            end = size
        if start < 0 or start > end or end > size:
            raise ValueError(f"bad slice [{start}:{end}] of a {size}-byte buffer")
        n = end - start
        remaining = self.body_length - self.consumed
        if n > remaining:
            n = <Py_ssize_t>remaining
        return self._run(p + start, n)

    def result(self):
        """A new ScanResult for the body scanned so far (complete once done)."""
        cdef ScanResult r
        if self.done:
            return self.res
        r = self.res._copy()
        if r.comment is None:
            r.comment = self.legacy_comment
        if self.render:
            r.query_shape = self._shape()
        return r

    # -- the state machine ---------------------------------------------------

    cdef int _fail(self, int reason, int64_t pos) except -1:
        self.state = ST_ERROR
        self.error_reason = reason
        raise DecodeError(DECODE_REASONS[reason], f"op {self.opcode} at body offset {pos}")

    cdef int _run(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t i = 0
        cdef int64_t base = self.consumed
        cdef int64_t lim_rel
        cdef Py_ssize_t stop, k, m
        cdef const unsigned char* q
        cdef const unsigned char* v
        cdef Frame* f
        cdef int st
        cdef unsigned char b
        while True:
            st = self.state
            if st == ST_TYPE:
                if i >= n:
                    break
                f = &self.stack[self.depth - 1]
                if f.node == NULL and not (f.flags & (FL_FIRST | FL_STRLIST | FL_RENDER)):
                    i = _skim(f, p, n, i, base)
                    if i >= n:
                        break
                b = p[i]
                i += 1
                if base + i == f.end:
                    if b != 0:
                        return self._fail(R_MISSING_TERM, base + i - 1)
                    self._pop()
                    continue
                if b == 0:
                    return self._fail(R_MISSING_TERM, base + i - 1)
                if not TYPE_OK[b]:
                    return self._fail(R_UNKNOWN_TYPE, base + i - 1)
                self.etype = b
                f.count += 1
                self.key_total = 0
                self.cap_len = 0
                if (f.flags & FL_RENDER) and not self.rfull:
                    if f.count > 1:
                        self._remit(",", 1)
                    if not (f.flags & FL_ARRAY):
                        self._remit("\"", 1)
                self.state = ST_KEY
            elif st == ST_KEY:
                f = &self.stack[self.depth - 1]
                # the key's NUL must come before the terminator position
                lim_rel = f.end - 1 - base
                if lim_rel <= i:
                    return self._fail(R_STR_NOT_TERM, base + i)
                stop = n if n < lim_rel else <Py_ssize_t>lim_rel
                if stop <= i:
                    break
                q = <const unsigned char*>memchr(p + i, 0, stop - i)
                if q == NULL:
                    self._key_piece(p + i, stop - i)
                    i = stop
                    if stop == lim_rel:
                        return self._fail(R_STR_NOT_TERM, base + i)
                    break
                k = q - (p + i)
                if self.key_total == 0:  # the whole key lies in this chunk: read it in place
                    if (f.flags & FL_RENDER) and not (f.flags & FL_ARRAY) and not self.rfull:
                        self._remit_escaped(p + i, k)
                    self.key_total = k
                    self._key_done(p + i, p + i)
                else:
                    self._key_piece(p + i, k)
                    self._key_done(self.keybuf, self.cap)
                i += k + 1
                self._dispatch(base + i)
            elif st == ST_SKIP:
                if self.skip_left > 0:
                    m = n - i
                    if m > self.skip_left:
                        m = <Py_ssize_t>self.skip_left
                    i += m
                    self.skip_left -= m
                    if self.skip_left > 0:
                        break
                self.state = self.after_skip
            elif st == ST_VLEN:
                v = _take(self, p, n, &i, 4)
                if v == NULL:
                    break
                self._value_len(<int32_t>_u32(v))
            elif st == ST_NUL:
                if i >= n:
                    break
                b = p[i]
                i += 1
                if b != 0:
                    return self._fail(self.nul_reason, base + i - 1)
                self.state = self.after_nul
            elif st == ST_STR:
                if self.str_left > 0:
                    if i >= n:
                        break
                    m = n - i
                    if m > self.str_left:
                        m = <Py_ssize_t>self.str_left
                    if self.str_capture:
                        if self.cap_len == 0 and m >= self.cap_max:
                            self.str_capture = False
                            self._store_str(self.cur.field, p + i, self.cap_max, self.str_total,
                                            self.cur.flags & CF_FIRST_WINS)
                        else:
                            k = self.cap_max - self.cap_len
                            if k > m:
                                k = m
                            memcpy(self.cap + self.cap_len, p + i, k)
                            self.cap_len += k
                            if self.cap_len == self.cap_max:
                                self.str_capture = False
                                self._store_str(self.cur.field, self.cap, self.cap_len, self.str_total,
                                                self.cur.flags & CF_FIRST_WINS)
                    if self.str_render:
                        self._rstr_piece(p + i, m)
                    i += m
                    self.str_left -= m
                    if self.str_left > 0:
                        break
                if self.str_capture:  # the empty string
                    self.str_capture = False
                    self._store_str(self.cur.field, self.cap, 0, 0, self.cur.flags & CF_FIRST_WINS)
                if self.str_render:
                    if not self.rstr_done and self.rstr_n < self.str_total:
                        self._remit("\xe2\x80\xa6", 3)
                    self._remit("\"", 1)
                self.state = ST_NUL
            elif st == ST_VFIXED:
                v = _take(self, p, n, &i, self.fixed_len)
                if v == NULL:
                    break
                if self.fixed_cap:
                    self._store_num(self.cur, self.etype, v)
                if self.fixed_render:
                    self._render_fixed(self.etype, v)
                self.state = ST_TYPE
            elif st == ST_CSTR:
                f = &self.stack[self.depth - 1]
                lim_rel = f.end - 1 - base
                if lim_rel <= i:
                    return self._fail(R_STR_NOT_TERM, base + i)
                stop = n if n < lim_rel else <Py_ssize_t>lim_rel
                if stop <= i:
                    break
                q = <const unsigned char*>memchr(p + i, 0, stop - i)
                if q == NULL:
                    if self.str_render:
                        self._remit_escaped(p + i, stop - i)
                    i = stop
                    if stop == lim_rel:
                        return self._fail(R_STR_NOT_TERM, base + i)
                    break
                k = q - (p + i)
                if self.str_render:
                    self._remit_escaped(p + i, k)
                i += k + 1
                self.cstr_left -= 1
                if self.cstr_left > 0:
                    if self.str_render:
                        self._remit("/", 1)
                else:
                    if self.str_render:
                        self._remit("\"", 1)
                    self.state = ST_TYPE
            elif st == ST_ROOT_LEN:
                v = _take(self, p, n, &i, 4)
                if v == NULL:
                    break
                self._root_len(<int32_t>_u32(v), base + i)
            elif st == ST_SEQ:
                if self.seq_left == 0 or base + i == self.seq_end:
                    if self.seq_left > 0:
                        return self._fail(R_TRUNCATED, base + i)
                    self.state = self.seq_next
                    continue
                if self.seq_left > 0:
                    self.seq_left -= 1
                self.seq_count += 1
                if self.seq_count_docs:
                    self.res.documents += 1
                if self.seq_first_node != NULL and self.seq_count == 1:
                    self._begin_doc(base + i, self.seq_end, self.seq_first_node, self.seq_first_flags,
                                    ST_SEQ, self.seq_short_reason)
                else:
                    self._begin_doc(base + i, self.seq_end, NULL, 0, ST_SEQ, self.seq_short_reason)
            elif st == ST_STEP:
                self._begin_step(base + i)
            elif st == ST_LFIXED:
                v = _take(self, p, n, &i, self.fixed_len)
                if v == NULL:
                    break
                self._layout_fixed(v, base + i)
            elif st == ST_MSG_SECTION:
                if base + i == self.sections_end:
                    if self.has_checksum:
                        self.fixed_len = 4
                        self.fixed_cap = False
                        self.post_skip = 0
                        self.layout_arg = L_CHECKSUM
                        self.state = ST_LFIXED
                    else:
                        self.state = ST_STEP
                    continue
                if i >= n:
                    break
                b = p[i]
                i += 1
                if b == 0:
                    if self.body_seen:
                        self._begin_doc(base + i, self.sections_end, NULL, 0, ST_MSG_SECTION, R_TRUNCATED)
                    else:
                        self.body_seen = True
                        self._begin_doc(base + i, self.sections_end,
                                        REPLY_ROOT if self.is_reply else REQ_ROOT,
                                        (0 if self.is_reply else FL_FIRST) | (FL_RENDER if self.render else 0),
                                        ST_MSG_SECTION, R_TRUNCATED)
                elif b == 1:
                    if base + i + 4 > self.sections_end:
                        return self._fail(R_TRUNCATED, base + i)
                    self.fixed_len = 4
                    self.post_skip = 0
                    self.layout_arg = L_SEQ_SIZE
                    self.state = ST_LFIXED
                else:
                    return self._fail(R_BAD_SECTION, base + i - 1)
            elif st == ST_SEQ_IDENT:
                lim_rel = self.section_end - base
                if lim_rel <= i:
                    return self._fail(R_STR_NOT_TERM, base + i)
                stop = n if n < lim_rel else <Py_ssize_t>lim_rel
                if stop <= i:
                    break
                q = <const unsigned char*>memchr(p + i, 0, stop - i)
                if q == NULL:
                    self._ident_piece(p + i, stop - i)
                    i = stop
                    if stop == lim_rel:
                        return self._fail(R_STR_NOT_TERM, base + i)
                    break
                k = q - (p + i)
                self._seq_ident_done(p + i, k)
                i += k + 1
            elif st == ST_LCSTR:
                lim_rel = self.body_length - base
                if lim_rel <= i:
                    return self._fail(R_TRUNCATED, base + i)
                stop = n if n < lim_rel else <Py_ssize_t>lim_rel
                if stop <= i:
                    break
                q = <const unsigned char*>memchr(p + i, 0, stop - i)
                k = (stop - i) if q == NULL else (q - (p + i))
                m = self.cap_max - self.cap_len
                if m > k:
                    m = k
                memcpy(self.cap + self.cap_len, p + i, m)
                self.cap_len += m
                self.key_total += k
                if q == NULL:
                    i = stop
                    if stop == lim_rel:
                        return self._fail(R_TRUNCATED, base + i)
                    break
                i += k + 1
                self._layout_cstring(self.layout_arg)
            else:  # ST_DONE
                break
        self.consumed = base + i
        if self.state == ST_DONE:
            if not self.done:
                self._finish()
        elif self.consumed == self.body_length:
            return self._fail(R_TRUNCATED, self.consumed)
        return 0

    cdef int _finish(self) except -1:
        self.done = True
        if self.res.comment is None:
            self.res.comment = self.legacy_comment
        if self.render:
            self.res.query_shape = self._shape()
        return 0

    # -- layout --------------------------------------------------------------

    cdef int _next_step(self) except -1:
        self.state = ST_STEP
        return 0

    cdef int _begin_step(self, int64_t pos) except -1:
        cdef const Step* s = &self.prog[self.step]
        cdef int kind = s.kind
        cdef const SpecNode* node
        cdef int flags
        self.step += 1
        if kind == K_I32 or kind == K_I64:
            self.fixed_len = 4 if kind == K_I32 else 8
            if pos + self.fixed_len > self.body_length:
                return self._fail(R_TRUNCATED, pos)
            self.layout_arg = s.arg
            self.post_skip = 0
            self.state = ST_LFIXED
        elif kind == K_CSTR:
            self.cap_len = 0
            self.cap_max = self.max_string + 1
            self.key_total = 0
            self.layout_arg = s.arg
            self.state = ST_LCSTR
        elif kind == K_DOC:
            flags = FL_RENDER if self.render else 0
            if s.arg == D_REPLY:
                node = REPLY_ROOT
            elif s.arg == D_QUERY and not self.query_is_cmd:
                node = LEGACY_QUERY_ROOT
            else:
                node = REQ_ROOT
                flags |= FL_FIRST
            self._begin_doc(pos, self.body_length, node, flags, ST_STEP, R_TRUNCATED)
        elif kind == K_SKIPDOC or (kind == K_OPTDOC and pos < self.body_length):
            self._begin_doc(pos, self.body_length, NULL, 0, ST_STEP, R_TRUNCATED)
        elif kind == K_OPTDOC:
            self.state = ST_STEP
        elif kind == K_DOCS or kind == K_REPLY_DOCS:
            self.seq_end = self.body_length
            self.seq_left = self.n_returned if kind == K_REPLY_DOCS else -1
            self.seq_count = 0
            self.seq_count_docs = kind == K_DOCS and s.arg != 0
            self.seq_first_node = REPLY_ROOT if kind == K_REPLY_DOCS else NULL
            self.seq_first_flags = FL_RENDER if self.render else 0
            self.seq_short_reason = R_TRUNCATED
            self.seq_next = ST_STEP
            self.state = ST_SEQ
        elif kind == K_KILL_IDS:
            if self.n_cursors == 0:
                self.state = ST_STEP
            else:
                if pos + 8 * self.n_cursors > self.body_length:
                    return self._fail(R_TRUNCATED, pos)
                self.fixed_len = 8
                self.layout_arg = L_CURSOR
                self.post_skip = 8 * (self.n_cursors - 1)
                self.state = ST_LFIXED
        elif kind == K_MSG_SECTIONS:
            self.state = ST_MSG_SECTION
        else:  # K_END
            if pos != self.body_length:
                return self._fail(R_TRAILING, pos)
            self.state = ST_DONE
        return 0

    cdef int _layout_fixed(self, const unsigned char* v, int64_t pos) except -1:
        cdef int arg = self.layout_arg
        cdef int64_t x
        if arg == L_FLAGS:
            self.res.flags = _u32(v)
        elif arg == L_MSG_FLAGS:
            self.res.flags = _u32(v)
            self.sections_end = self.body_length
            if self.res.flags & 1:
                self.has_checksum = True
                self.sections_end = self.body_length - 4
                if self.sections_end < pos:
                    return self._fail(R_TRUNCATED, pos)
        elif arg == L_CURSOR:
            self.res.cursor_id = <int64_t>_u64(v)
        elif arg == L_NRETURNED:
            x = <int32_t>_u32(v)
            if x < 0:
                return self._fail(R_BAD_LENGTH, pos - 4)
            self.n_returned = x
            self.res.returned = x
        elif arg == L_NCURSORS:
            x = <int32_t>_u32(v)
            if x < 0:
                return self._fail(R_BAD_LENGTH, pos - 4)
            self.n_cursors = x
        elif arg == L_CHECKSUM:
            self.res.checksum = _u32(v)
        elif arg == L_SEQ_SIZE:
            x = <int32_t>_u32(v)
            self.section_end = pos - 4 + x
            if x < 5 or self.section_end > self.sections_end:
                return self._fail(R_BAD_LENGTH, pos - 4)
            self.key_total = 0
            self.state = ST_SEQ_IDENT
            return 0
        if self.post_skip > 0:
            self.skip_left = self.post_skip
            self.post_skip = 0
            self.after_skip = ST_STEP
            self.state = ST_SKIP
        else:
            self.state = ST_STEP
        return 0

    cdef int _layout_cstring(self, int field) except -1:
        cdef object s = self._decode_cut(self.cap, self.cap_len, self.key_total)
        if field == F_NAMESPACE:
            self.res.namespace = s
            db, sep, rest = s.partition(".")
            self.res.database = db
            if sep:
                if rest == "$cmd" and self.opcode == C_OP_QUERY:
                    self.query_is_cmd = True
                else:
                    self.res.collection = rest
        elif field == F_DATABASE:
            self.res.database = s
        else:
            self.res.command = s
        self.state = ST_STEP
        return 0

    # -- documents -----------------------------------------------------------

    cdef int _begin_doc(self, int64_t pos, int64_t limit, const SpecNode* node, int flags, int after,
                        int short_reason) except -1:
        if pos + 4 > limit:
            return self._fail(short_reason, pos)
        self.root_limit = limit
        self.root_node = node
        self.root_flags = flags
        self.after_doc = after
        self.vstart = pos
        self.state = ST_ROOT_LEN
        return 0

    cdef int _root_len(self, int64_t length, int64_t pos) except -1:
        cdef int64_t start = self.vstart
        if length < 5 or start + length > self.root_limit:
            return self._fail(R_BAD_LENGTH, start)
        if self.root_node != NULL or (self.root_flags & FL_RENDER):
            if self.root_flags & FL_STMT:  # render the statement into its own region (see _shape)
                self._rreserve(2 * (self.render_limit + 8))  # only scanners that see writes hold it
                self.rsave_len = self.rlen
                self.rsave_full = self.rfull
                self.rbuf = self.rmem + self.render_limit + 8
                self.rlen = 0
                self.rfull = False
            self._push(start + length, self.root_node, -1, self.root_flags)
        else:
            self.skip_left = length - 5
            self.after_skip = ST_NUL
            self.nul_reason = R_MISSING_TERM
            self.after_nul = self.after_doc
            self.state = ST_SKIP
        return 0

    cdef int _push(self, int64_t end, const SpecNode* node, int count_field, int flags) except -1:
        cdef Frame* grown
        if self.depth >= self.stack_cap:
            # Callers never push past RENDER_DEPTH (< STACK_MAX), so one step of growth is enough.
            grown = <Frame*>PyMem_Malloc(sizeof(Frame) * STACK_MAX)
            if grown == NULL:
                raise MemoryError()
            memcpy(grown, self.stack, sizeof(Frame) * self.depth)
            self.stack = grown
            self.stack_cap = STACK_MAX
        cdef Frame* f = &self.stack[self.depth]
        f.end = end
        f.node = node
        f.count = 0
        f.count_field = count_field
        f.flags = flags
        self.depth += 1
        if (flags & FL_RENDER) and not self.rfull:
            self._remit("[" if flags & FL_ARRAY else "{", 1)
        self.state = ST_TYPE
        return 0

    cdef int _pop(self) except -1:
        cdef Frame* f = &self.stack[self.depth - 1]
        if f.count_field >= 0:
            self._set_count(f.count_field, f.count, f.flags & FL_ADD)
        if (f.flags & FL_RENDER) and not self.rfull:
            self._remit("]" if f.flags & FL_ARRAY else "}", 1)
        if f.flags & FL_STMT:
            self.rstmt_len = self.rlen
            self.rstmt_full = self.rfull
            self.rbuf = self.rmem
            self.rlen = self.rsave_len
            self.rfull = self.rsave_full
        self.depth -= 1
        self.state = ST_TYPE if self.depth > 0 else self.after_doc
        return 0

    cdef int _key_piece(self, const unsigned char* s, Py_ssize_t k) except -1:
        cdef Frame* f = &self.stack[self.depth - 1]
        cdef Py_ssize_t m
        if self.key_total < KEY_MAX:
            m = KEY_MAX - <Py_ssize_t>self.key_total
            if m > k:
                m = k
            memcpy(self.keybuf + self.key_total, s, m)
        if f.flags & FL_FIRST:
            m = self.max_string + 1 - self.cap_len
            if m > k:
                m = k
            if m > 0:
                memcpy(self.cap + self.cap_len, s, m)
                self.cap_len += m
        if (f.flags & FL_RENDER) and not (f.flags & FL_ARRAY) and not self.rfull:
            self._remit_escaped(s, k)
        self.key_total += k
        return 0

    cdef void _seq_ident_done(self, const unsigned char* s, Py_ssize_t k) noexcept:
        # the identifier's last k bytes are at s: start the sequence, reading the first document of a
        # request's `updates`/`deletes` for its q.$comment
        cdef const unsigned char* ident = s
        if self.key_total == 0:  # the whole identifier lies in this chunk: read it in place
            self.key_total = k
        else:
            self._ident_piece(s, k)
            ident = self.keybuf
        self.seq_first_node = NULL
        self.seq_first_flags = 0
        if not self.is_reply and self.key_total == 7 and (
                memcmp(ident, b"updates", 7) == 0 or memcmp(ident, b"deletes", 7) == 0):
            self.seq_first_node = WRITE_SEQ_ROOT
            # only the first statement of the first such sequence is rendered; other kind-1 documents never
            if self.render and self.rstmt_len < 0:
                self.seq_first_flags = FL_RENDER | FL_STMT
                self.rstmt_deletes = ident[0] == b"d"[0]
        self.seq_end = self.section_end
        self.seq_left = -1
        self.seq_count = 0
        self.seq_count_docs = True
        self.seq_short_reason = R_BAD_LENGTH
        self.seq_next = ST_MSG_SECTION
        self.state = ST_SEQ

    cdef void _ident_piece(self, const unsigned char* s, Py_ssize_t k) noexcept:
        # a kind-1 identifier split across chunks: keep its first KEY_MAX bytes, count them all
        cdef Py_ssize_t m
        if self.key_total < KEY_MAX:
            m = KEY_MAX - <Py_ssize_t>self.key_total
            if m > k:
                m = k
            memcpy(self.keybuf + self.key_total, s, m)
        self.key_total += k

    cdef int _key_done(self, const unsigned char* key, const unsigned char* first) except -1:
        # key: the first min(key_total, KEY_MAX) bytes; first: min(key_total, max_string + 1) bytes
        cdef Frame* f = &self.stack[self.depth - 1]
        cdef int64_t kt = self.key_total
        cdef const SpecChild* c = NULL
        cdef const SpecChild* ch
        cdef const SpecNode* node
        cdef int j
        cdef bint rendering = (f.flags & FL_RENDER) and not self.rfull
        self.vsecret = False
        if rendering and not (f.flags & FL_ARRAY):
            self._remit("\":", 2)
        if f.flags & FL_FIRST:
            f.flags &= ~FL_FIRST
            if self.opcode == C_OP_QUERY and self.etype == 0x03 and _key_is(key, kt, b"$query", 6):
                c = &C_QUERY_WRAP
            else:
                self._store_str(F_COMMAND, first, kt if kt <= self.max_string else self.max_string + 1, kt,
                                False)
                if _key_is(key, kt, b"getMore", 7):
                    c = &C_FIRST_GETMORE
                else:
                    c = &C_FIRST
                    if _key_is(key, kt, b"authenticate", 12):
                        self.rsecret_all = True
        elif f.flags & FL_STRLIST:
            if self.strlist_n < STRLIST_MAX:
                c = &C_STRITEM
        elif f.node != NULL and kt < KEY_MAX and (f.node.lengths >> kt) & 1:
            node = f.node
            for j in range(node.nchildren):
                ch = &node.children[j]
                if ch.keylen == kt and ch.key[0] == <char>key[0] and memcmp(ch.key, key, <size_t>kt) == 0:
                    c = ch
                    break
        self.cur = c
        if rendering and kt <= KEY_MAX and _secret_key(key, kt):
            self.vsecret = True
        return 0

    cdef int _dispatch(self, int64_t pos) except -1:
        cdef int t = self.etype
        cdef Frame* f = &self.stack[self.depth - 1]
        cdef const SpecChild* c = self.cur
        cdef int k = FIXED_SIZE[t]
        cdef int rmode = self.render if ((f.flags & FL_RENDER) and not self.rfull) else 0
        if rmode and (self.vsecret or self.rsecret_all):
            self._remit("\"?\"", 3)
            rmode = 0
        self.vrmode = rmode
        if k >= 0:
            if pos + k > f.end - 1:
                return self._fail(R_BAD_LENGTH, pos)
            self.fixed_cap = c != NULL and t < 32 and (c.accept >> t) & 1
            if rmode == 1:
                self._remit("\"?\"", 3)
            self.fixed_render = rmode == 2
            if k == 0:
                if self.fixed_render:
                    self._render_fixed(t, NULL)
                self.state = ST_TYPE
            elif self.fixed_cap or self.fixed_render:
                self.fixed_len = k
                self.state = ST_VFIXED
            else:
                self.skip_left = k
                self.after_skip = ST_TYPE
                self.state = ST_SKIP
        elif t == 0x0B:
            if rmode == 1:
                self._remit("\"?\"", 3)
            self.str_render = rmode == 2
            if self.str_render:
                self._remit("\"/", 2)
            self.cstr_left = 2
            self.state = ST_CSTR
        else:
            if pos + 4 > f.end - 1:
                return self._fail(R_BAD_LENGTH, pos)
            self.vstart = pos
            self.state = ST_VLEN
        return 0

    cdef int _value_len(self, int64_t length) except -1:
        cdef int t = self.etype
        cdef int64_t start = self.vstart
        cdef int64_t lim = self.stack[self.depth - 1].end - 1
        cdef const SpecChild* c = self.cur
        cdef int rmode = self.vrmode
        cdef bint spec, rend
        cdef int flags, count_field
        cdef int64_t extra
        cdef int k
        cdef char tmp[48]
        if t == 0x02 or t == 0x0D or t == 0x0E or t == 0x0C:
            if length < 1:
                return self._fail(R_STR_NOT_TERM, start)
            extra = 12 if t == 0x0C else 0
            if start + 4 + length + extra > lim:
                return self._fail(R_BAD_LENGTH, start)
            self.str_capture = t == 0x02 and c != NULL and (c.accept & A_STR)
            if self.str_capture:
                self.cap_len = 0
                self.cap_max = self.max_string + 1
                if self.cap_max > length - 1:
                    self.cap_max = length - 1
            self.str_render = (rmode == 2 and t != 0x0C) or (
                rmode == 1 and t == 0x02 and c != NULL and (c.flags & CF_SHOW))
            if self.str_render:
                self._remit("\"", 1)
                self.rstr_n = 0
                self.rstr_done = False
            elif rmode == 1:
                self._remit("\"?\"", 3)
            elif rmode == 2:
                self._remit("\"<dbpointer>\"", 13)
            self.str_total = length - 1
            self.str_left = length - 1
            self.nul_reason = R_STR_NOT_TERM
            if extra:
                self.after_nul = ST_SKIP
                self.skip_left = extra
                self.after_skip = ST_TYPE
            else:
                self.after_nul = ST_TYPE
            self.state = ST_STR
        elif t == 0x03 or t == 0x04:
            if length < 5 or start + length > lim:
                return self._fail(R_BAD_LENGTH, start)
            spec = c != NULL and (c.node != NULL or (t == 0x04 and (c.count_field >= 0 or (c.flags & CF_STRLIST))))
            rend = rmode != 0
            if rend and self.depth >= RENDER_DEPTH:
                self._rtruncate()
                rend = False
            if (spec or rend) and self.depth < RENDER_DEPTH:
                flags = FL_ARRAY if t == 0x04 else 0
                if rend:
                    flags |= FL_RENDER
                count_field = -1
                if spec:
                    if t == 0x04 and c.count_field >= 0:
                        count_field = c.count_field
                        if c.flags & CF_ADD:
                            flags |= FL_ADD
                    if t == 0x04 and (c.flags & CF_STRLIST):
                        flags |= FL_STRLIST
                        self.strlist_n = 0
                        self.res.compression = []
                    if c.flags & CF_ENTER_FIRST:
                        flags |= FL_FIRST
                self._push(start + length, c.node if spec else NULL, count_field, flags)
            else:
                self.skip_left = length - 5
                self.after_skip = ST_NUL
                self.nul_reason = R_MISSING_TERM
                self.after_nul = ST_TYPE
                self.state = ST_SKIP
        elif t == 0x05:
            if length < 0 or start + 5 + length > lim:
                return self._fail(R_BAD_LENGTH, start)
            if rmode == 1:
                self._remit("\"?\"", 3)
            elif rmode == 2:
                k = snprintf(tmp, sizeof(tmp), "\"<binary %lld>\"", <long long>length)
                self._remit(tmp, k)
            self.skip_left = 1 + length
            self.after_skip = ST_TYPE
            self.state = ST_SKIP
        else:  # 0x0F code with scope: int32 total, string, document
            if length < 14 or start + length > lim:
                return self._fail(R_BAD_LENGTH, start)
            if rmode == 1:
                self._remit("\"?\"", 3)
            elif rmode == 2:
                self._remit("\"<code_w_scope>\"", 16)
            self.skip_left = length - 5
            self.after_skip = ST_NUL
            self.nul_reason = R_MISSING_TERM
            self.after_nul = ST_TYPE
            self.state = ST_SKIP
        return 0

    # -- captured values -----------------------------------------------------

    cdef object _decode_cut(self, const unsigned char* s, Py_ssize_t have, int64_t total):
        """UTF-8 text of a string of `total` bytes of which `have` (>= min(total, max+1)) are at s."""
        cdef Py_ssize_t cut = have
        if total > self.max_string:
            cut = self.max_string
            while cut > 0 and (s[cut] & 0xC0) == 0x80:
                cut -= 1
        try:
            return PyUnicode_DecodeUTF8(<char*>s, cut, NULL)
        except UnicodeDecodeError:
            self._fail(R_INVALID_UTF8, self.consumed)

    cdef int _store_str(self, int field, const unsigned char* s, Py_ssize_t have, int64_t total,
                        bint first_wins) except -1:
        cdef object val
        if total <= STR_CACHE_MAX and have >= total and (NAME_FIELDS >> field) & 1:
            try:
                val = _name(s, total)
            except UnicodeDecodeError:
                self._fail(R_INVALID_UTF8, self.consumed)
        else:
            val = self._decode_cut(s, have, total)
        cdef ScanResult r = self.res
        if field == F_STRITEM:
            r.compression.append(val)
            self.strlist_n += 1
        elif field == F_COMMAND:
            r.command = val
        elif field == F_COLLECTION:
            if not first_wins or r.collection is None:
                r.collection = val
        elif field == F_DATABASE:
            r.database = val
        elif field == F_COMMENT:
            r.comment = val
        elif field == F_LEGACY_COMMENT:
            if self.legacy_comment is None:
                self.legacy_comment = val
        elif field == F_TRACEPARENT:
            r.comment_traceparent = val
        elif field == F_TRACESTATE:
            r.comment_tracestate = val
        elif field == F_APP_NAME:
            r.app_name = val
        elif field == F_DRIVER_NAME:
            r.driver_name = val
        elif field == F_DRIVER_VERSION:
            r.driver_version = val
        elif field == F_CODE_NAME:
            r.code_name = val
        elif field == F_ERRMSG:
            r.errmsg = val
        elif field == F_CURSOR_NS:
            r.cursor_ns = val
        elif field == F_WE_CODE_NAME:
            r.write_error_code_name = val
        elif field == F_WCE_CODE_NAME:
            r.write_concern_error_code_name = val
        elif field == F_SET_NAME:
            r.set_name = val
        elif field == F_ME:
            r.me = val
        return 0

    cdef int _store_num(self, const SpecChild* c, int t, const unsigned char* v) except -1:
        cdef int64_t iv = 0
        cdef double d = 0.0
        cdef bint is_double = False
        cdef object val
        cdef ScanResult r = self.res
        cdef int field = F_CURSOR_ID if c == &C_FIRST_GETMORE else c.field
        if t == 0x10:
            iv = <int32_t>_u32(v)
        elif t == 0x12:
            iv = <int64_t>_u64(v)
        elif t == 0x08:
            iv = 1 if v[0] else 0
        else:
            d = _f64(v)
            is_double = True
        if c.flags & CF_FLOAT:
            val = d if is_double else <double>iv
        elif is_double:
            if not isfinite(d):
                return 0
            val = int(d)
        else:
            val = iv
        if field == F_CURSOR_ID:
            r.cursor_id = val
        elif field == F_OK:
            r.ok = val
        elif field == F_CODE:
            r.code = val
        elif field == F_N:
            r.n = val
        elif field == F_N_MODIFIED:
            r.n_modified = val
        elif field == F_WE_CODE:
            r.write_error_code = val
        elif field == F_WCE_CODE:
            r.write_concern_error_code = val
        elif field == F_LAST_ERROR_N:
            r.last_error_n = val
        elif field == F_MAX_WIRE:
            r.max_wire_version = val
        return 0

    cdef int _set_count(self, int field, int64_t count, bint add) except -1:
        cdef ScanResult r = self.res
        if field == F_DOCUMENTS:
            r.documents += count
        elif field == F_RETURNED:
            r.returned = count
        elif field == F_UPSERTED:
            r.upserted = count
        elif field == F_WRITE_ERRORS:
            r.write_errors = count
        return 0

    # -- rendering -----------------------------------------------------------

    cdef int _rreserve(self, Py_ssize_t cap) except -1:
        # called only while rbuf is rmem (not inside a statement)
        cdef char* nbuf
        if self.rcap < cap:
            nbuf = <char*>PyMem_Realloc(self.rmem, cap)
            if nbuf == NULL:
                raise MemoryError()
            self.rmem = self.rbuf = nbuf
            self.rcap = cap
        return 0

    cdef void _rtruncate(self) noexcept:
        cdef Py_ssize_t i
        cdef unsigned char lead
        cdef int need
        if not self.rfull:
            # A character may have been split across two pieces: drop its incomplete start so that
            # where the text is cut never depends on how the body was chunked.
            i = self.rlen - 1
            while i >= 0 and i >= self.rlen - 4 and (<unsigned char>self.rbuf[i] & 0xC0) == 0x80:
                i -= 1
            if i >= 0 and i < self.rlen:
                lead = <unsigned char>self.rbuf[i]
                need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                if lead >= 0xC0 and i + need > self.rlen:
                    self.rlen = i
            memcpy(self.rbuf + self.rlen, b"\xe2\x80\xa6", 3)
            self.rlen += 3
            self.rfull = True

    cdef void _remit(self, const char* s, Py_ssize_t k) noexcept:
        cdef Py_ssize_t cut
        if self.rfull:
            return
        if self.rlen + k > self.render_limit:
            cut = self.render_limit - self.rlen
            while cut > 0 and (<unsigned char>s[cut] & 0xC0) == 0x80:
                cut -= 1
            memcpy(self.rbuf + self.rlen, s, cut)
            self.rlen += cut
            self._rtruncate()
            return
        memcpy(self.rbuf + self.rlen, s, k)
        self.rlen += k

    cdef void _remit_escaped(self, const unsigned char* s, Py_ssize_t k) noexcept:
        cdef Py_ssize_t j = 0
        cdef Py_ssize_t run
        cdef unsigned char b
        cdef char esc[8]
        while j < k and not self.rfull:
            run = j
            while run < k:
                b = s[run]
                if b < 0x20 or b == 0x22 or b == 0x5C:
                    break
                run += 1
            if run > j:
                self._remit(<const char*>(s + j), run - j)
                j = run
            if j < k:
                b = s[j]
                if b == 0x22:
                    self._remit("\\\"", 2)
                elif b == 0x5C:
                    self._remit("\\\\", 2)
                else:
                    snprintf(esc, sizeof(esc), "\\u%04x", <unsigned int>b)
                    self._remit(esc, 6)
                j += 1

    cdef void _rstr_piece(self, const unsigned char* s, Py_ssize_t k) noexcept:
        # cut at RSTR_MAX bytes, extended to the end of the character in progress
        cdef Py_ssize_t j = 0
        cdef Py_ssize_t m
        if self.rstr_done or self.rfull:
            return
        if self.rstr_n < RSTR_MAX:
            m = RSTR_MAX - <Py_ssize_t>self.rstr_n
            if m > k:
                m = k
            self._remit_escaped(s, m)
            self.rstr_n += m
            j = m
        while j < k:
            if (s[j] & 0xC0) == 0x80:
                self._remit(<const char*>(s + j), 1)
                self.rstr_n += 1
                j += 1
            else:
                self._remit("\xe2\x80\xa6", 3)
                self.rstr_done = True
                return

    cdef void _render_fixed(self, int t, const unsigned char* v) noexcept:
        cdef char tmp[96]
        cdef int k = 0
        cdef int prec
        cdef double d
        cdef int j
        if t == 0x01:
            d = _f64(v)
            if isfinite(d):
                for prec in range(15, 18):
                    k = snprintf(tmp, sizeof(tmp), "%.*g", prec, d)
                    if strtod(tmp, NULL) == d:
                        break
            elif d != d:
                k = snprintf(tmp, sizeof(tmp), "\"NaN\"")
            else:
                k = snprintf(tmp, sizeof(tmp), "\"%sInfinity\"", "-" if d < 0 else "")
        elif t == 0x07:
            k = snprintf(tmp, sizeof(tmp), "{\"$oid\":\"")
            for j in range(12):
                k += snprintf(tmp + k, sizeof(tmp) - k, "%02x", <unsigned int>v[j])
            k += snprintf(tmp + k, sizeof(tmp) - k, "\"}")
        elif t == 0x08:
            k = snprintf(tmp, sizeof(tmp), "%s", "true" if v[0] else "false")
        elif t == 0x09:
            k = snprintf(tmp, sizeof(tmp), "{\"$date\":%lld}", <long long><int64_t>_u64(v))
        elif t == 0x0A:
            k = snprintf(tmp, sizeof(tmp), "null")
        elif t == 0x06:
            k = snprintf(tmp, sizeof(tmp), "{\"$undefined\":true}")
        elif t == 0x10:
            k = snprintf(tmp, sizeof(tmp), "%d", <int>(<int32_t>_u32(v)))
        elif t == 0x11:
            k = snprintf(tmp, sizeof(tmp), "{\"$timestamp\":{\"t\":%u,\"i\":%u}}",
                         <unsigned int>_u32(v + 4), <unsigned int>_u32(v))
        elif t == 0x12:
            k = snprintf(tmp, sizeof(tmp), "%lld", <long long><int64_t>_u64(v))
        elif t == 0x13:
            k = snprintf(tmp, sizeof(tmp), "\"<decimal128>\"")
        elif t == 0x7F:
            k = snprintf(tmp, sizeof(tmp), "{\"$maxKey\":1}")
        else:
            k = snprintf(tmp, sizeof(tmp), "{\"$minKey\":1}")
        if k > 0:
            self._remit(tmp, k)

    cdef object _shape(self):
        # The command document's rendering, with the first kind-1 write statement spliced in before its
        # closing brace as `"updates":[{...}]` (the form of a one-statement command sent in kind-0), then
        # cut at render_limit. The splice happens here, once, so the text is the same whichever section
        # came first and however the body was chunked.
        cdef bytes out
        cdef Py_ssize_t cut
        if (self.rstmt_len <= 0 or self.rfull or self.rsecret_all or self.rlen < 2
                or self.rbuf[self.rlen - 1] != b"}"[0]):
            return PyUnicode_DecodeUTF8(self.rbuf, self.rlen, b"replace")
        out = b"".join((
            self.rbuf[:self.rlen - 1],
            b"," if self.rlen > 2 else b"",
            b'"deletes":[' if self.rstmt_deletes else b'"updates":[',
            (self.rmem + self.render_limit + 8)[:self.rstmt_len],
            b"]}",
        ))
        if len(out) > self.render_limit:
            # a cut statement is never shorter than the limit minus one character, and the head is longer
            # than that, so this cut always falls inside the statement's uncut text
            cut = self.render_limit
            while cut > 0 and (out[cut] & 0xC0) == 0x80:
                cut -= 1
            out = out[:cut] + b"\xe2\x80\xa6"
        return PyUnicode_DecodeUTF8(out, len(out), b"replace")


def scan_body(int opcode, bint is_reply, body):
    """Convenience: scan a complete body in one call."""
    cdef BodyScanner s = BodyScanner()
    cdef object mv = memoryview(body)
    s.reset(opcode, is_reply, mv.nbytes)
    s.feed(mv)
    return s.result()
