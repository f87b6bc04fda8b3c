# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled core of caf-sharing: versioned persistent maps, snapshot refs and
change sets. It knows nothing of I/O; everything above it is plain Python.

Data structure
--------------
Every version of a :class:`SharedMap` is a hash array mapped trie (HAMT):
bitmap nodes of up to 8 slots indexed by 3-bit chunks of the key's 64-bit
``hash()`` (popcount of the bitmap gives the slot), and collision nodes for
keys whose whole hash is equal. A change copies only the path from the root
to the changed slot, so ``m.ref()`` is O(1), a commit of k keys is
O(k log n), and any number of live versions share all untouched nodes.
Edits inside one ref mutate the nodes that ref already copied (an owner id on
each node, as in Clojure's transients), so ten edits under the same root copy
the root once. The owner id is dropped whenever the ref's root escapes (views,
iterators, commit), so nothing that escaped is ever mutated.

A commit whose base version nothing else can see any more edits that
version's trie in place instead (like Swift's copy-on-write uniqueness
test): when the only holders of the base snapshot are the map and the
committing ref, and its root is held by nothing but them, every node on a
path whose reference count is 1 is reachable only through that path, so it
is claimed for the commit's owner id and edited where it is; the first node
something else holds (a ref, view or iterator of the version, an older
version sharing the subtree) and everything below it is copied as usual.
``apply_changes`` does the same when no ref holds the current version.

Nodes keep their items inside the node object (size classes of 4, 8 and 16
item slots) rather than in a separate list: at a million keys each trie level
then costs one cache miss instead of three.

Writes are memory-bound
-----------------------
At a million keys a write to a random key is all cache misses: the path
nodes, every neighbour a copied node must add a reference to, the dict index
slot, and (when the old version goes) the pymalloc pool headers of the nodes
it frees. So a ref's ``set``/``delete`` only record the edit in a small dict;
the trie edits wait until something needs the trie (``commit``, ``len``,
iteration, ``dump``), and an applied change set arrives whole. Then the paths
of up to 16 keys are walked level by level with software prefetches for all
of them (``_prefetch_paths``) before any node is copied, so the misses
overlap instead of forming one serial chain per key; the 8-way fanout keeps
the neighbours per copied node few. Reads of an edited ref look in its edit
dict, then in its base version, and never need the trie. Waiting for
``commit`` rather than ``prepare`` is what lets the edits go in place: only
then is it known that the ref's version will not be seen again.

Measured with benchmarks/compare_core.py (1M keys, 10 random keys per
write, min of interleaved rounds, 2-core VM shared with other jobs): 10 sets
+ prepare + commit went from 32.0 us to 20.7-21.9 us with the batched,
prefetched copies alone, and apply_changes of 10 keys from 26.0 us to
16.2-17.7 us (``immutables.Map`` mutate + finish: 19.4-22.7 us in the same
runs). Deferring and batching the trie edits gave ~6 us of that,
prefetching the index slots and pool headers ~2.5 us, the fanout of 8
instead of 32 ~3 us. What was left then was mostly copying the paths (the
neighbours' misses, TLB) and freeing the replaced nodes, which editing an
unobserved base version in place removes: in A/B runs of the same
benchmark that took the commit from 21.9 to 10.7 us and apply_changes from
17.7 to 7.6 us. Loading the index entries the k updates will read, all at
once (``caf_load_dict_entries``; a probe collision reads another key and a
second slot, which no prefetch of the first slot covers; prefetches of
those lines did nothing measurable, likely as they miss the TLB too) took another
~1 us off each in A/B runs, to 8.9 and 6.1 us. In full compare_core runs
P3 is now 9.7-9.9 us and P4 5.4-5.5 us (immutables 20.3-21.6 us); a
commit while a reader still holds its base version copies as before and
takes 18.0-18.6 us (the benchmark's note times that case). What remains is
the trie walk's misses (~1.5 us), the index updates, Python calls (10
``set``, ``prepare`` building the change set, ``commit``), and ~0.5 us for
freeing history entries that fell out of ``max_updates``.

Hybrid reads
------------
The newest version also keeps a plain ``dict`` of its entries (the *index*),
and refs of that version read through it (after their own edits, if any);
refs of older versions read the trie. Measured (benchmarks/compare_core.py): the trie lookup
alone is ~2.1x ``dict.get`` at 10k keys and ~1.4x at 1M (8-way nodes make
it deeper than a 32-way trie, which was ~1.45x and ~1.1x), the index path
~1.15x and ~1.0x. The P1 target is 1.5x, so the index is what meets it.
A commit or an applied change set moves the index to the new version by
applying the same k edits to it (O(k)) and detaches it from the old version,
whose holders fall back to the trie (same content, so isolation holds). Only
one index exists per map, whatever the number of live versions.

Versions and history
--------------------
The version is not stored in the trie: ``__ca_version__`` is reserved, the
version is an int field of each snapshot, and ``dump()`` appends the pair.
Committed and applied change sets are recorded, deep-frozen, in a bounded
history (``max_updates``) kept as an append-only list plus a window
``[lo, hi)`` per snapshot, so a ref captures the history of its version in
O(1) and ``updates_slice`` can serve replicas. A change set with version 0
is a full dump (the Caf.js wire format): it is loaded only if its version is
newer than the map's, and it restarts the history instead of being recorded.

Versions come from the wire, and a replica never goes back, so one forged
version would pin it for good: a change set must make exactly its version
+ 1, a dump a version below 2**53 (the versions Lua and JavaScript numbers
hold exactly), and ``prepare`` refuses to go past it. A list of change sets
is one message: all of it is checked, versions chained, before any of it is
applied.

Iteration order is trie order (by hash bits), not insertion order. String
hashes are randomized per process (PYTHONHASHSEED), so the order differs
between processes; compare contents, not sequences.

Values are JSON data, validated and deep-frozen once when they enter a map
(:class:`FrozenDict`, :class:`FrozenList`); reads hand out the stored object.
"""

cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_SetSlice
from cpython.object cimport PyObject, PyObject_Hash
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_XINCREF
from cpython.unicode cimport PyUnicode_FromObject
from libc.math cimport isfinite
from libc.string cimport memcmp, memcpy, memmove

from caf_sharing.errors import (
    ConcurrentUpdateError,
    InvalidChangeSetError,
    InvalidTypeError,
    InvalidValueError,
    MissedUpdateError,
    NoExecError,
    PrepareRequiredError,
    ReadOnlyError,
    SharingError,
    UnknownMethodError,
)

cdef extern from *:
    void PyObject_GC_UnTrack(void* op)
    int __builtin_popcount(unsigned int x) nogil
    void __builtin_prefetch(const void* addr, int rw, int locality) nogil
    long long PyLong_AsLongLongAndOverflow(object v, int* overflow)
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject* s)
    int PyUnicode_KIND_PTR "PyUnicode_KIND" (PyObject* s)
    void* PyUnicode_DATA(PyObject* s)
    int PyUnicode_KIND(object s)
    int PyUnicode_1BYTE_KIND

cdef extern from *:
    """
    /* Prefetch of the hash-table index slot a dict lookup of `hash` reads
       first (the entries are found in time without help). The layout
       mirrors CPython 3.11/3.12 Include/internal/pycore_dict.h (struct
       _dictkeysobject); other versions get a no-op. Only header fields are
       read, and a prefetch never faults. */
    #if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
    typedef struct {
        Py_ssize_t dk_refcnt;
        uint8_t dk_log2_size;
        uint8_t dk_log2_index_bytes;
        uint8_t dk_kind;
        uint32_t dk_version;
        Py_ssize_t dk_usable;
        Py_ssize_t dk_nentries;
        char dk_indices[];
    } caf_dict_keys;

    static inline void caf_prefetch_dict_slot(PyObject *d, Py_hash_t hash) {
        PyDictObject *mp = (PyDictObject *)d;
        caf_dict_keys *dk = (caf_dict_keys *)mp->ma_keys;
        size_t i = (size_t)hash & (((size_t)1 << dk->dk_log2_size) - 1);
        /* dk_log2_index_bytes - dk_log2_size: log2 of the bytes per slot */
        __builtin_prefetch(dk->dk_indices + (i << (dk->dk_log2_index_bytes - dk->dk_log2_size)),
                           0, 3);
    }

    static inline Py_ssize_t caf_dict_index(const caf_dict_keys *dk, size_t i) {
        switch (dk->dk_log2_index_bytes - dk->dk_log2_size) {
        case 0: return ((const int8_t *)dk->dk_indices)[i];
        case 1: return ((const int16_t *)dk->dk_indices)[i];
        case 2: return ((const int32_t *)dk->dk_indices)[i];
        default: return ((const int64_t *)dk->dk_indices)[i];
        }
    }

    /* The key of entry `ix` (entries follow the indices: (key, value) in
       str-only tables, (hash, key, value) in general ones). */
    static inline PyObject *caf_dict_entry_key(const caf_dict_keys *dk, Py_ssize_t ix) {
        PyObject *const *e = (PyObject *const *)(
            dk->dk_indices + ((size_t)1 << dk->dk_log2_index_bytes)
            + (size_t)ix * (dk->dk_kind == 0 ? 3 : 2) * sizeof(PyObject *));
        return e[dk->dk_kind == 0 ? 1 : 0];
    }

    /* Loads, for up to 16 keys at once, what a lookup of each in `d` will
       read: the entry its first index slot (cached already, see
       caf_prefetch_dict_slot) points to and, when that entry holds another
       key (a probe collision), that key's hash and the next slot and entry.
       These are real loads, not prefetches: at a million keys nearly each
       is a TLB miss too, and prefetching these lines measured no gain
       (a prefetch that misses the TLB may be dropped). Loads of different keys do not depend on each other, so the misses
       overlap; the lookups that follow then hit the cache. The probe
       sequence is CPython's (Objects/dictobject.c, PERTURB_SHIFT 5). */
    static void caf_load_dict_entries(PyObject *d, PyObject **keys, Py_hash_t *hashes,
                                      Py_ssize_t n) {
        PyDictObject *mp = (PyDictObject *)d;
        const caf_dict_keys *dk = (const caf_dict_keys *)mp->ma_keys;
        size_t mask = ((size_t)1 << dk->dk_log2_size) - 1;
        PyObject *found[16];
        Py_ssize_t ix[16];
        Py_ssize_t j;
        for (j = 0; j < n; j++) {
            ix[j] = caf_dict_index(dk, (size_t)hashes[j] & mask);
            found[j] = ix[j] >= 0 ? caf_dict_entry_key(dk, ix[j]) : NULL;
            __asm__ volatile("" :: "r"(found[j]));
        }
        for (j = 0; j < n; j++) {
            size_t perturb, i;
            Py_ssize_t ix2;
            if (found[j] == keys[j] || ix[j] == -1)  /* the key, or DKIX_EMPTY */
                continue;
            if (found[j] != NULL && dk->dk_kind != 0) {
                Py_hash_t other = ((PyASCIIObject *)found[j])->hash;
                __asm__ volatile("" :: "r"(other));
            }
            perturb = (size_t)hashes[j] >> 5;
            i = mask & (((size_t)hashes[j] & mask) * 5 + perturb + 1);
            ix2 = caf_dict_index(dk, i);
            if (ix2 >= 0) {
                PyObject *k2 = caf_dict_entry_key(dk, ix2);
                __asm__ volatile("" :: "r"(k2));
            }
        }
    }
    #else
    static inline void caf_prefetch_dict_slot(PyObject *d, Py_hash_t hash) {
        (void)d; (void)hash;
    }
    static void caf_load_dict_entries(PyObject *d, PyObject **keys, Py_hash_t *hashes,
                                      Py_ssize_t n) {
        (void)d; (void)keys; (void)hashes; (void)n;
    }
    #endif
    """
    void caf_prefetch_dict_slot(PyObject* d, Py_hash_t hash) nogil
    void caf_load_dict_entries(PyObject* d, PyObject** keys, Py_hash_t* hashes,
                               Py_ssize_t n) nogil
    Py_ssize_t Py_REFCNT(PyObject* o) nogil

cdef extern from *:
    """
    /* Gives the empty list `list` room for `n` items in one allocation, so
       that appending them never reallocates: a list grown by appends to a
       million items leaves its smaller copies' memory behind in the heap,
       and the last one there too when it is freed. */
    static int caf_list_reserve(PyObject *list, Py_ssize_t n) {
        PyListObject *l = (PyListObject *)list;
        PyObject **items;
        if (Py_SIZE(l) != 0 || n <= l->allocated)
            return 0;
        items = PyMem_New(PyObject *, n);
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        PyMem_Free(l->ob_item);
        l->ob_item = items;
        l->allocated = n;
        return 0;
    }
    """
    int caf_list_reserve(object lst, Py_ssize_t n) except -1

cdef extern from "Python.h":
    bint PyDict_Next(object d, Py_ssize_t* pos, PyObject** key, PyObject** value)

__all__ = [
    "FIRST_VERSION",
    "FUNCTION_MARKER",
    "MAX_DEPTH",
    "VERSION_KEY",
    "FrozenDict",
    "FrozenList",
    "MapRef",
    "SharedMap",
    "load_fields",
]

FIRST_VERSION = 0
FUNCTION_MARKER = "function_PlkW02z*Z10"
MAX_DEPTH = 64
VERSION_KEY = "__ca_version__"

cdef int _MAX_DEPTH = 64
cdef str _VERSION_KEY = "__ca_version__"
cdef str _FUNCTION_MARKER = "function_PlkW02z*Z10"
# Versions stay below 2**53: they travel through Lua and JavaScript, whose
# numbers are doubles, exact only up to there.
cdef long long _VERSION_LIMIT = 2 ** 53

# Marks a missing entry in trie lookups (None is a valid value).
cdef object _MISSING = object()
# Marks a deleted key in a ref's pending edits.
cdef object _TOMBSTONE = object()

# Owner ids for in-place edits of freshly copied trie nodes; 0 = frozen.
cdef unsigned long long _next_owner = 1

cdef inline unsigned long long _new_owner() noexcept:
    global _next_owner
    _next_owner += 1
    return _next_owner


# ---------------------------------------------------------------------------
# Frozen JSON containers
# ---------------------------------------------------------------------------

cdef class _PathError(Exception):
    """Internal: a bad value somewhere inside a container; `path` grows while
    the error unwinds so only failing calls pay for building it."""
    cdef public list path
    cdef public bint is_type
    cdef public str reason

    def __init__(self, bint is_type, str reason):
        self.path = []
        self.is_type = is_type
        self.reason = reason


cdef str _format_path(list path):
    cdef list parts = []
    for p in reversed(path):
        parts.append(f"[{p!r}]")
    return "".join(parts)


cdef object _public_error(_PathError err, str what):
    """Turns an internal _PathError into InvalidTypeError/InvalidValueError."""
    cdef str where = what
    if err.path:
        where = f"{what} at {_format_path(err.path)}"
    cls = InvalidTypeError if err.is_type else InvalidValueError
    return cls(f"{where}: {err.reason}")


cdef inline int _height(object v):
    cdef type t = type(v)
    if t is FrozenDict:
        return (<FrozenDict>v)._height
    if t is FrozenList:
        return (<FrozenList>v)._height
    return 0


cdef inline bint _is_sealed(object v):
    """Whether a FrozenDict/FrozenList (exact type) was built by the core or
    its constructor."""
    if type(v) is FrozenDict:
        return (<FrozenDict>v)._sealed
    return (<FrozenList>v)._sealed


cdef int _check_str(str s) except -1:
    """Rejects lone surrogates (not encodable as UTF-8). Latin-1 strings (one
    byte per char) cannot hold any, so the common case is one branch."""
    cdef Py_UCS4 c
    cdef Py_ssize_t i = 0
    if PyUnicode_KIND(s) == PyUnicode_1BYTE_KIND:
        return 0
    for c in s:
        if 0xD800 <= c <= 0xDFFF:
            raise _PathError(False, f"str with a lone surrogate at index {i} "
                                    "cannot be encoded as UTF-8")
        i += 1
    return 0


cdef str _type_name(object v):
    return type(v).__name__


cdef object _freeze(object v, int level):
    """Validates JSON data and returns it deep-frozen. `level` counts the
    containers enclosing `v`. Frozen containers are valid by construction, so
    they are returned as they are once their height fits."""
    cdef type t = type(v)
    cdef double d
    cdef int overflow = 0
    if t is str:
        _check_str(<str>v)
        return v
    if t is int:
        PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            raise _PathError(False, f"int {v} is outside the 64-bit range")
        return v
    if v is None or t is bool:
        return v
    if t is float:
        d = v
        if not isfinite(d):
            if d != d:
                raise _PathError(False, "float nan is not allowed (JSON has no NaN)")
            raise _PathError(False, f"float {v!r} is not allowed (JSON has no Infinity)")
        return v
    if t is FrozenDict or t is FrozenList:
        # Trusted as frozen and valid only when sealed: one made by
        # __new__ alone was never validated, and its height is not known.
        if not _is_sealed(v):
            raise _PathError(True, f"{_type_name(v)} was never initialised (made by "
                                   "__new__ without its constructor)")
        if level + _height(v) > _MAX_DEPTH:
            raise _PathError(False, f"nesting deeper than MAX_DEPTH={_MAX_DEPTH}")
        return v
    if t is list or t is tuple:
        return _freeze_list(v, level)
    if t is dict:
        return _freeze_dict(v, level)
    # Subclasses of the JSON types are stored as the plain type, so what is
    # stored and sent never carries foreign behaviour.
    if isinstance(v, str):
        v = PyUnicode_FromObject(v)
        _check_str(<str>v)
        return v
    if isinstance(v, int):
        return _freeze(int(v), level)
    if isinstance(v, float):
        return _freeze(float(v), level)
    if isinstance(v, (list, tuple)):
        return _freeze_list(v, level)
    if isinstance(v, dict):
        return _freeze_dict(v, level)
    raise _PathError(True, f"type {_type_name(v)} is not JSON data (allowed: None, bool, "
                           "int, float, str, list, tuple, dict)")


cdef FrozenList _freeze_list(object v, int level):
    if level >= _MAX_DEPTH:
        raise _PathError(False, f"nesting deeper than MAX_DEPTH={_MAX_DEPTH}")
    cdef FrozenList out = FrozenList.__new__(FrozenList)
    cdef int h = 0, ch
    cdef Py_ssize_t i = 0
    for item in v:
        try:
            item = _freeze(item, level + 1)
        except _PathError as err:
            (<_PathError>err).path.append(i)
            raise
        ch = _height(item)
        if ch > h:
            h = ch
        PyList_Append(out, item)
        i += 1
    out._height = h + 1
    out._sealed = True
    _untrack(out)
    return out


cdef FrozenDict _freeze_dict(object v, int level):
    if level >= _MAX_DEPTH:
        raise _PathError(False, f"nesting deeper than MAX_DEPTH={_MAX_DEPTH}")
    cdef FrozenDict out = FrozenDict.__new__(FrozenDict)
    cdef int h = 0, ch
    for key, item in v.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise _PathError(True, f"dict key {key!r} ({_type_name(key)}) is not a str")
            key = PyUnicode_FromObject(key)
        try:
            _check_str(<str>key)
        except _PathError as err:
            (<_PathError>err).reason = f"dict key {key!r}: {(<_PathError>err).reason}"
            raise
        try:
            item = _freeze(item, level + 1)
        except _PathError as err:
            (<_PathError>err).path.append(key)
            raise
        ch = _height(item)
        if ch > h:
            h = ch
        PyDict_SetItem(out, key, item)
    out._height = h + 1
    out._sealed = True
    _untrack(out)
    return out


cdef object _thaw(object v, int level):
    """Plain mutable deep copy of frozen data. Stored values are at most
    MAX_DEPTH deep, but a frozen container can still be altered through the
    methods of dict or list (``list.append(frozen, frozen)``), so the depth
    is checked rather than trusted: a C recursion must never run away."""
    cdef type t = type(v)
    if t is not FrozenDict and t is not FrozenList:
        return v
    if level >= _MAX_DEPTH:
        raise InvalidValueError(
            f"frozen value nested deeper than MAX_DEPTH={_MAX_DEPTH} (a frozen container "
            "was changed through a method of dict or list)")
    if t is FrozenDict:
        return {k: _thaw(x, level + 1) for k, x in (<dict>v).items()}
    return [_thaw(x, level + 1) for x in <list>v]


cdef inline FrozenList _frozen_list_of(list items, int height):
    """Wraps already frozen items without validating them again."""
    cdef FrozenList out = FrozenList.__new__(FrozenList)
    PyList_SetSlice(out, 0, 0, items)
    out._height = height
    out._sealed = True
    _untrack(out)
    return out


cdef FrozenDict _frozen_change_set(long long version, FrozenList remove, FrozenList add):
    cdef FrozenDict out = FrozenDict.__new__(FrozenDict)
    PyDict_SetItem(out, "version", version)
    PyDict_SetItem(out, "remove", remove)
    PyDict_SetItem(out, "add", add)
    out._height = max(remove._height, add._height) + 1
    out._sealed = True
    _untrack(out)
    return out


cdef int _pairs_height(list pairs):
    """Height of a FrozenList holding the alternating keys/values `pairs`."""
    cdef int h = 0, ch
    cdef Py_ssize_t i
    for i in range(1, len(pairs), 2):
        ch = _height(pairs[i])
        if ch > h:
            h = ch
    return h + 1


cdef inline void _untrack(object frozen) noexcept:
    """Take a sealed frozen container out of the cyclic garbage collector.

    It holds only JSON atoms and other frozen containers, a tree, so it can
    be in no reference cycle, and the collector would only visit it again
    and again: the history and values of a map are most of what a busy
    process holds (with 100 actors committing, full collections took 60 us
    of a 100 us commit). A frozen container altered into a cycle through a
    method of dict or list (``list.append(frozen, frozen)``) is then never
    freed: it leaks, it does not crash.
    """
    PyObject_GC_UnTrack(<void*>frozen)


cdef object _immutable(str name, str method):
    raise TypeError(f"{name} is immutable: {method}() is not supported "
                    "(build a new plain value and set it instead)")


@cython.auto_pickle(False)
cdef class FrozenDict(dict):
    """A deep-frozen ``dict`` of JSON data (str keys).

    It compares equal to plain dicts, is accepted wherever a dict is read,
    serializes with orjson/json and pickles; every mutator raises TypeError.
    The constructor takes what ``dict()`` takes and validates and freezes the
    content (InvalidTypeError / InvalidValueError naming the path). One made
    by ``__new__`` alone is not sealed, and the core refuses it as a value.
    """
    cdef int _height
    cdef bint _sealed

    def __init__(self, *args, **kwargs):
        if self._sealed or len(self):
            _immutable("FrozenDict", "__init__")
        cdef dict plain = dict(*args, **kwargs)
        cdef FrozenDict built
        try:
            built = _freeze_dict(plain, 0)
        except _PathError as err:
            raise _public_error(<_PathError>err, "FrozenDict value") from None
        dict.update(self, built)
        self._height = built._height
        self._sealed = True
        _untrack(self)

    def __setitem__(self, key, value):
        _immutable("FrozenDict", "__setitem__")

    def __delitem__(self, key):
        _immutable("FrozenDict", "__delitem__")

    def clear(self):
        _immutable("FrozenDict", "clear")

    def pop(self, *args):
        _immutable("FrozenDict", "pop")

    def popitem(self):
        _immutable("FrozenDict", "popitem")

    def setdefault(self, *args):
        _immutable("FrozenDict", "setdefault")

    def update(self, *args, **kwargs):
        _immutable("FrozenDict", "update")

    def __ior__(self, other):
        _immutable("FrozenDict", "__ior__")

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


@cython.auto_pickle(False)
cdef class FrozenList(list):
    """A deep-frozen ``list`` of JSON data.

    It compares equal to plain lists, serializes with orjson/json and pickles;
    every mutator raises TypeError. The constructor takes an iterable and
    validates and freezes its items (InvalidTypeError / InvalidValueError
    naming the path). One made by ``__new__`` alone is not sealed, and the
    core refuses it as a value.
    """
    cdef int _height
    cdef bint _sealed

    def __init__(self, iterable=()):
        if self._sealed or len(self):
            _immutable("FrozenList", "__init__")
        cdef FrozenList built
        try:
            built = _freeze_list(list(iterable), 0)
        except _PathError as err:
            raise _public_error(<_PathError>err, "FrozenList item") from None
        PyList_SetSlice(self, 0, 0, built)
        self._height = built._height
        self._sealed = True
        _untrack(self)

    def __setitem__(self, index, value):
        _immutable("FrozenList", "__setitem__")

    def __delitem__(self, index):
        _immutable("FrozenList", "__delitem__")

    def append(self, value):
        _immutable("FrozenList", "append")

    def extend(self, values):
        _immutable("FrozenList", "extend")

    def insert(self, index, value):
        _immutable("FrozenList", "insert")

    def pop(self, *args):
        _immutable("FrozenList", "pop")

    def remove(self, value):
        _immutable("FrozenList", "remove")

    def clear(self):
        _immutable("FrozenList", "clear")

    def sort(self, *args, **kwargs):
        _immutable("FrozenList", "sort")

    def reverse(self):
        _immutable("FrozenList", "reverse")

    def __iadd__(self, other):
        _immutable("FrozenList", "__iadd__")

    def __imul__(self, other):
        _immutable("FrozenList", "__imul__")

    def __reduce__(self):
        return (FrozenList, (list(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------

cdef int _check_hashable(object key) except -1:
    """Raises TypeError for a key of an unhashable type, as a dict lookup
    would, without hashing it: a non-str key is never present, and hashing a
    deeply nested tuple recurses in C with no depth check."""
    if type(key).__hash__ is None:
        raise TypeError(f"unhashable type: '{_type_name(key)}'")
    return 0


cdef str _check_key(object key, str action):
    """Returns `key` as an exact str, or raises naming it."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise InvalidTypeError(
                f"cannot {action} key {key!r}: keys must be str, not {_type_name(key)}")
        key = PyUnicode_FromObject(key)
    if key == _VERSION_KEY:
        raise InvalidValueError(
            f"cannot {action} key {key!r}: it is reserved for the map's version")
    try:
        _check_str(<str>key)
    except _PathError as err:
        raise InvalidValueError(
            f"cannot {action} key {key!r}: {(<_PathError>err).reason}") from None
    return key


cdef object _freeze_value(str key, object value):
    try:
        return _freeze(value, 0)
    except _PathError as err:
        raise _public_error(<_PathError>err, f"value for key {key!r}") from None


def load_fields(list flat not None, loads, list out not None):
    """Decodes a stored map's fields for a dump: `flat` alternates field
    names (bytes, UTF-8, or str) and raw values, as Redis's HSCAN and HGETALL
    return them. Appends to `out` each field as a str and its value as
    ``loads(raw)`` returns it, deep-frozen like ``ref.set`` stores it, so that
    ``apply_changes`` of the dump takes the values as they are instead of
    copying each. A value the core refuses stays as loaded: ``apply_changes``
    refuses it, as it would have. The field ``__ca_version__`` is not
    appended: returns its raw value (the last one), or None. What decoding
    raises (UnicodeDecodeError, ``loads``'s errors) propagates, with part of
    `flat` appended; values are not checked here for integers past 64 bits
    that ``loads`` turned into floats (the backends scan the raw bytes)."""
    cdef Py_ssize_t i, n = len(flat)
    cdef object version = None
    cdef object field, key, value
    if n % 2:
        raise ValueError(f"load_fields: {n} items, not field and value pairs")
    for i in range(0, n, 2):
        field = <object>PyList_GET_ITEM(flat, i)
        if type(field) is bytes:
            key = (<bytes>field).decode("utf-8")
        elif type(field) is str:
            key = field
        else:
            raise TypeError(f"load_fields: field {field!r} is not bytes or str")
        if key == _VERSION_KEY:
            version = <object>PyList_GET_ITEM(flat, i + 1)
            continue
        value = loads(<object>PyList_GET_ITEM(flat, i + 1))
        try:
            value = _freeze(value, 0)
        except _PathError:
            pass
        PyList_Append(out, key)
        PyList_Append(out, value)
    return version


# ---------------------------------------------------------------------------
# Hash array mapped trie
# ---------------------------------------------------------------------------
# A node's items alternate keys and values: k0, v0, k1, v1, ... In bitmap
# nodes a NULL key marks a slot whose value is a child node. Collision nodes
# hold only leaves, all with one hash. The items live inside the node object
# (the size classes below), so each trie level costs one memory load, not the
# three of a node pointing at a list pointing at its array; that is what
# dominates lookups and path copies once a map outgrows the CPU caches.
# Nodes hold only C fields, so the cycle GC never tracks them (a node cannot
# be part of a cycle: values are frozen JSON data).

cdef enum:
    # 8-way nodes: a copied path node adds references to at most 8
    # neighbours, each a likely cache (and TLB) miss at a million keys. The
    # extra levels cost less than those misses: measured at 1M keys, 10
    # random writes took ~1 us less with 3 bits than with 4 and ~6 us less
    # than with 5 (benchmarks/compare_core.py P3/P4); 2 bits was slower again.
    _BITS = 3
    _FANOUT = 1 << _BITS
    _FANOUT_MASK = _FANOUT - 1
    # Bitmap levels for a 64-bit hash, plus a collision level, plus slack.
    _STACK = 64 // _BITS + 3


@cython.auto_pickle(False)
cdef class _Node:
    cdef PyObject** items       # points into the subclass's storage
    cdef Py_ssize_t n           # item slots in use (two per entry)
    cdef Py_ssize_t cap         # item slots available
    cdef unsigned int bitmap
    cdef bint collision
    cdef Py_hash_t hash         # collision nodes: the hash all keys share
    cdef unsigned long long owner

    def __dealloc__(self):
        _clear_items(self)


@cython.final
@cython.auto_pickle(False)
cdef class _Node4(_Node):
    cdef PyObject* store[4]


@cython.final
@cython.auto_pickle(False)
cdef class _Node8(_Node):
    cdef PyObject* store[8]


@cython.final
@cython.auto_pickle(False)
cdef class _Node16(_Node):
    cdef PyObject* store[_FANOUT * 2]   # a full bitmap node


@cython.final
@cython.auto_pickle(False)
cdef class _NodeHeap(_Node):
    """Collision nodes past 8 keys (practically only with truncated hashes)."""

    def __dealloc__(self):
        # Runs before _Node's: the items must be released before their storage.
        _clear_items(self)
        PyMem_Free(self.items)


cdef inline void _clear_items(_Node node) noexcept:
    """Drops the node's references to its items."""
    cdef Py_ssize_t i
    for i in range(node.n):
        Py_XDECREF(node.items[i])
    node.n = 0


cdef _Node _alloc(Py_ssize_t cap, unsigned long long owner):
    cdef _Node node
    if cap <= 4:
        node = _Node4.__new__(_Node4)
        node.items = (<_Node4>node).store
        node.cap = 4
    elif cap <= 8:
        node = _Node8.__new__(_Node8)
        node.items = (<_Node8>node).store
        node.cap = 8
    elif cap <= _FANOUT * 2:
        node = _Node16.__new__(_Node16)
        node.items = (<_Node16>node).store
        node.cap = _FANOUT * 2
    else:
        node = _NodeHeap.__new__(_NodeHeap)
        node.items = <PyObject**>PyMem_Malloc(cap * sizeof(PyObject*))
        if node.items == NULL:
            raise MemoryError()
        node.cap = cap
    node.owner = owner
    return node


cdef inline void _set(_Node node, Py_ssize_t i, object o) noexcept:
    """Stores a new reference to `o` in an unused slot."""
    Py_INCREF(o)
    node.items[i] = <PyObject*>o


cdef inline void _set_key(_Node node, Py_ssize_t i, object key) noexcept:
    """Like _set, for a key slot: None marks a child (NULL)."""
    if key is None:
        node.items[i] = NULL
    else:
        _set(node, i, key)


cdef inline void _replace(_Node node, Py_ssize_t i, object o, bint is_key) noexcept:
    cdef PyObject* old = node.items[i]
    if is_key:
        _set_key(node, i, o)
    else:
        _set(node, i, o)
    Py_XDECREF(old)


cdef inline object _key_at(_Node node, Py_ssize_t i):
    cdef PyObject* p = node.items[i]
    return None if p == NULL else <object>p


cdef inline void _copy_items(_Node dst, Py_ssize_t at, _Node src, Py_ssize_t lo,
                             Py_ssize_t hi) noexcept:
    """Copies src.items[lo:hi] to dst.items[at:], adding references."""
    cdef Py_ssize_t i
    cdef PyObject* p
    for i in range(lo, hi):
        p = src.items[i]
        Py_XINCREF(p)
        dst.items[at + i - lo] = p


cdef _Node _copy_node(_Node src, Py_ssize_t cap, unsigned long long owner):
    cdef _Node dst = _alloc(cap, owner)
    _copy_items(dst, 0, src, 0, src.n)
    dst.n = src.n
    dst.bitmap = src.bitmap
    dst.collision = src.collision
    dst.hash = src.hash
    return dst


cdef _Node _with_pair(_Node node, Py_ssize_t idx, str key, object val,
                      unsigned long long owner):
    """`node` with the pair (key, val) inserted at item `idx`; edits in place
    when the node is owned and has room."""
    cdef _Node out
    cdef Py_ssize_t n = node.n
    if owner and node.owner == owner and n + 2 <= node.cap:
        memmove(&node.items[idx + 2], &node.items[idx], (n - idx) * sizeof(PyObject*))
        out = node
    else:
        out = _alloc(n + 2, owner)
        out.bitmap = node.bitmap
        out.collision = node.collision
        out.hash = node.hash
        if owner and node.owner == owner:
            # An owned node never escaped its ref, so its parent is its only
            # holder and replaces it by `out`: move the references over.
            memcpy(out.items, node.items, idx * sizeof(PyObject*))
            memcpy(&out.items[idx + 2], &node.items[idx], (n - idx) * sizeof(PyObject*))
            node.n = 0
        else:
            _copy_items(out, 0, node, 0, idx)
            _copy_items(out, idx + 2, node, idx, n)
    _set_key(out, idx, key)
    _set(out, idx + 1, val)
    out.n = n + 2
    return out


cdef _Node _without_pair(_Node node, Py_ssize_t idx, unsigned long long owner):
    """`node` without the pair at item `idx`."""
    cdef _Node out
    cdef Py_ssize_t n = node.n
    cdef PyObject* k
    cdef PyObject* v
    if owner and node.owner == owner:
        k = node.items[idx]
        v = node.items[idx + 1]
        memmove(&node.items[idx], &node.items[idx + 2], (n - idx - 2) * sizeof(PyObject*))
        node.n = n - 2
        Py_XDECREF(k)
        Py_XDECREF(v)
        return node
    out = _alloc(n - 2, owner)
    out.bitmap = node.bitmap
    out.collision = node.collision
    out.hash = node.hash
    _copy_items(out, 0, node, 0, idx)
    _copy_items(out, idx, node, idx + 2, n)
    out.n = n - 2
    return out


cdef _Node _with_slot(_Node node, Py_ssize_t idx, object key, object val,
                      unsigned long long owner):
    """`node` with the pair at item `idx` replaced (key None: a child)."""
    if not (owner and node.owner == owner):
        node = _copy_node(node, node.n, owner)
    _replace(node, idx, key, True)
    _replace(node, idx + 1, val, False)
    return node


cdef inline unsigned int _bit(Py_hash_t h, unsigned int shift) noexcept:
    return 1u << ((<unsigned long long>h >> shift) & _FANOUT_MASK)


cdef inline Py_ssize_t _slot(unsigned int bitmap, unsigned int bit) noexcept:
    # Inline bit counting: without -mpopcnt, __builtin_popcount is a libgcc call.
    cdef unsigned int x = bitmap & (bit - 1)
    x = x - ((x >> 1) & 0x55555555u)
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u)
    x = (x + (x >> 4)) & 0x0F0F0F0Fu
    return 2 * <Py_ssize_t>((x * 0x01010101u) >> 24)


cdef inline bint _same_key(PyObject* a, str b) noexcept:
    return a == <PyObject*>b or _str_eq(a, <PyObject*>b)


cdef inline bint _str_eq(PyObject* a, PyObject* b) noexcept:
    """Equality of two str objects (canonical PEP 393 forms compare by bytes)."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(a)
    cdef int kind = PyUnicode_KIND_PTR(a)
    return (n == PyUnicode_GET_LENGTH(b) and kind == PyUnicode_KIND_PTR(b)
            and memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), n * kind) == 0)


cdef PyObject* _find(PyObject* node, str key, Py_hash_t h) noexcept:
    """The value of `key` (a borrowed reference), or NULL. Walks with raw
    pointers: no reference counting on the way down."""
    cdef unsigned int shift = 0, bit, bitmap
    cdef Py_ssize_t idx, i, n
    cdef PyObject** items
    cdef PyObject* k
    while node != NULL:
        items = (<_Node>node).items
        if not (<_Node>node).collision:
            bitmap = (<_Node>node).bitmap
            bit = _bit(h, shift)
            if not (bitmap & bit):
                return NULL
            idx = _slot(bitmap, bit)
            k = items[idx]
            if k == NULL:
                node = items[idx + 1]
                shift += _BITS
                continue
            if k == <PyObject*>key or _str_eq(k, <PyObject*>key):
                return items[idx + 1]
            return NULL
        if (<_Node>node).hash != h:
            return NULL
        n = (<_Node>node).n
        for i in range(0, n, 2):
            k = items[i]
            if k == <PyObject*>key or _str_eq(k, <PyObject*>key):
                return items[i + 1]
        return NULL
    return NULL


cdef enum:
    # Change sets of more keys than this, no smaller than the map they make,
    # are not kept in its history (SharedMap._keeps).
    _BIG_CHANGE = 4096


cdef enum:
    # Keys whose paths are fetched together (their hashes sit on the C stack);
    # 16 already keeps more misses in flight than the CPU can track.
    _BATCH = 16


cdef inline void _prefetch_node(PyObject* node) noexcept:
    """Requests the cache lines of a node (header and items)."""
    cdef char* p = <char*>node
    cdef Py_ssize_t off
    for off in range(0, sizeof(PyObject*) * (_FANOUT * 2 + 8), 64):
        __builtin_prefetch(p + off, 1, 3)


cdef inline void _prefetch_pool(PyObject* p) noexcept:
    """Requests the header of the pymalloc pool (16 KiB in CPython 3.10+)
    holding `p`: freeing `p` writes it, and for old objects it is cold."""
    __builtin_prefetch(<void*>(<size_t>p & ~(<size_t>16383)), 1, 3)


cdef void _prefetch_paths(PyObject* root, Py_hash_t* hashes, Py_ssize_t n,
                          PyObject* index, unsigned long long owner) noexcept:
    """Brings into the cache, for the `n` hashes, the trie path of each and
    what copying it will touch (every referent of every node on it), and the
    slots of `index` (a dict, or NULL) that the edits will update. Walking
    all the paths level by level keeps one miss per key in flight at once
    instead of the serial chain of misses a lone descent costs.

    Nodes that `owner` (non-zero) owns are edited in place, not copied, so
    only the slot the edit reads is fetched for them. A child that only its
    owned parent holds (reference count 1) is reachable only through that
    parent, so it becomes owned too: this is how a commit that nothing else
    watches edits its base version's trie in place (see MapRef._commit_sync)."""
    cdef PyObject* nodes[_BATCH]
    cdef bint up_owned[_BATCH]
    cdef bint owned
    cdef unsigned int shift = 0, bit, bitmap
    cdef Py_ssize_t j, i, idx, live = n
    cdef PyObject** items
    cdef PyObject* k
    if index != NULL:
        for j in range(n):
            caf_prefetch_dict_slot(index, hashes[j])
    if root == NULL:
        return
    for j in range(n):
        nodes[j] = root
        up_owned[j] = False
    _prefetch_node(root)
    while live:
        live = 0
        for j in range(n):
            if nodes[j] == NULL:
                continue
            if up_owned[j] and Py_REFCNT(nodes[j]) == 1:
                (<_Node>nodes[j]).owner = owner
            owned = owner != 0 and (<_Node>nodes[j]).owner == owner
            items = (<_Node>nodes[j]).items
            if not owned:
                # Paths share their upper nodes: fetch what a node holds once.
                i = 0
                while i < j and nodes[i] != nodes[j]:
                    i += 1
                if i == j:
                    for i in range((<_Node>nodes[j]).n):
                        __builtin_prefetch(items[i], 1, 3)
                    # The node is replaced by a copy and freed with the old version.
                    _prefetch_pool(nodes[j])
            if (<_Node>nodes[j]).collision:
                nodes[j] = NULL
                continue
            bitmap = (<_Node>nodes[j]).bitmap
            bit = _bit(hashes[j], shift)
            if not (bitmap & bit):
                nodes[j] = NULL
                continue
            idx = _slot(bitmap, bit)
            k = items[idx]
            if k != NULL:
                if owned:
                    __builtin_prefetch(k, 0, 3)                 # compared
                    __builtin_prefetch(items[idx + 1], 1, 3)    # released
                _prefetch_pool(items[idx + 1])  # the value being replaced
                nodes[j] = NULL
                continue
            nodes[j] = items[idx + 1]
            up_owned[j] = owned
            _prefetch_node(nodes[j])
            live += 1
        shift += _BITS


cdef inline PyObject* _root_ptr(object root) noexcept:
    return NULL if root is None else <PyObject*>root


cdef _Node _leaf_node(unsigned int bitmap, object k1, object v1, object k2, object v2,
                      unsigned long long owner):
    """A node of one pair (k2 is _MISSING) or two pairs, in the given order."""
    cdef _Node node = _alloc(2 if k2 is _MISSING else 4, owner)
    node.bitmap = bitmap
    _set_key(node, 0, k1)
    _set(node, 1, v1)
    node.n = 2
    if k2 is not _MISSING:
        _set_key(node, 2, k2)
        _set(node, 3, v2)
        node.n = 4
    return node


cdef _Node _make_pair(unsigned int shift, Py_hash_t h1, str k1, object v1,
                      Py_hash_t h2, str k2, object v2, unsigned long long owner):
    """The smallest subtree at `shift` holding two distinct keys."""
    cdef _Node node
    if h1 == h2:
        node = _leaf_node(0, k1, v1, k2, v2, owner)
        node.collision = True
        node.hash = h1
        return node
    cdef unsigned int b1 = _bit(h1, shift), b2 = _bit(h2, shift)
    if b1 == b2:
        return _leaf_node(b1, None, _make_pair(shift + _BITS, h1, k1, v1, h2, k2, v2, owner),
                          _MISSING, None, owner)
    if b1 < b2:
        return _leaf_node(b1 | b2, k1, v1, k2, v2, owner)
    return _leaf_node(b1 | b2, k2, v2, k1, v1, owner)


cdef _Node _assoc(object root, unsigned int shift, Py_hash_t h, str key, object val,
                  unsigned long long owner, Py_hash_t mask, int* added):
    """`root` with key -> val. Nodes owned by `owner` are edited in place;
    returns `root` itself when nothing had to be copied."""
    cdef _Node node, sub
    cdef unsigned int bit
    cdef Py_ssize_t idx, i
    cdef PyObject* k
    cdef object child
    if root is None:
        added[0] = 1
        return _leaf_node(_bit(h, shift), key, val, _MISSING, None, owner)
    node = <_Node>root
    if not node.collision:
        bit = _bit(h, shift)
        idx = _slot(node.bitmap, bit)
        if not (node.bitmap & bit):
            added[0] = 1
            node = _with_pair(node, idx, key, val, owner)
            node.bitmap |= bit
            return node
        k = node.items[idx]
        if k == NULL:
            child = <object>node.items[idx + 1]
            sub = _assoc(child, shift + _BITS, h, key, val, owner, mask, added)
            if sub is child:
                return node
            return _with_slot(node, idx, None, sub, owner)
        if _same_key(k, key):
            if node.items[idx + 1] == <PyObject*>val:
                return node
            return _with_slot(node, idx, key, val, owner)
        added[0] = 1
        sub = _make_pair(shift + _BITS, PyObject_Hash(<object>k) & mask, <str>k,
                         <object>node.items[idx + 1], h, key, val, owner)
        return _with_slot(node, idx, None, sub, owner)
    if node.hash != h:
        # A different hash reached a collision node: push it one level down.
        sub = _leaf_node(_bit(node.hash, shift), None, node, _MISSING, None, owner)
        return _assoc(sub, shift, h, key, val, owner, mask, added)
    for i in range(0, node.n, 2):
        if _same_key(node.items[i], key):
            if node.items[i + 1] == <PyObject*>val:
                return node
            return _with_slot(node, i, key, val, owner)
    added[0] = 1
    return _with_pair(node, node.n, key, val, owner)


cdef inline bint _is_single_leaf(_Node node) noexcept:
    """Whether `node` holds exactly one key and no child: its parent can
    inline it, which keeps the trie as shallow as its content allows."""
    return node.n == 2 and node.items[0] != NULL


cdef object _without(object root, unsigned int shift, Py_hash_t h, str key,
                     unsigned long long owner, int* removed):
    """`root` without `key`; None when it becomes empty."""
    cdef _Node node, sub
    cdef unsigned int bit
    cdef Py_ssize_t idx, i
    cdef PyObject* k
    cdef object child, res
    if root is None:
        return None
    node = <_Node>root
    if not node.collision:
        bit = _bit(h, shift)
        if not (node.bitmap & bit):
            return node
        idx = _slot(node.bitmap, bit)
        k = node.items[idx]
        if k == NULL:
            child = <object>node.items[idx + 1]
            res = _without(child, shift + _BITS, h, key, owner, removed)
            # A child edited in place comes back as itself, maybe down to one key.
            if res is child and not (removed[0] and _is_single_leaf(<_Node>res)):
                return node
            if res is not None:
                sub = <_Node>res
                if _is_single_leaf(sub):
                    return _with_slot(node, idx, <object>sub.items[0], <object>sub.items[1],
                                      owner)
                return _with_slot(node, idx, None, sub, owner)
        elif not _same_key(k, key):
            return node
        else:
            removed[0] = 1
        # The slot goes away: its key was removed or its child became empty.
        if node.bitmap == bit:
            return None
        node = _without_pair(node, idx, owner)
        node.bitmap &= ~bit
        return node
    if node.hash != h:
        return node
    for i in range(0, node.n, 2):
        if _same_key(node.items[i], key):
            removed[0] = 1
            if node.n == 2:
                return None
            return _without_pair(node, i, owner)
    return node


cdef void _collect_pairs(object root, list out):
    """Appends every key and value of the trie to `out`, alternating."""
    cdef _Node node
    cdef Py_ssize_t i
    if root is None:
        return
    node = <_Node>root
    for i in range(0, node.n, 2):
        if node.items[i] == NULL:
            _collect_pairs(<object>node.items[i + 1], out)
        else:
            PyList_Append(out, <object>node.items[i])
            PyList_Append(out, <object>node.items[i + 1])


cdef void _collect_dict(object root, dict out, bint thaw):
    cdef _Node node
    cdef Py_ssize_t i
    if root is None:
        return
    node = <_Node>root
    for i in range(0, node.n, 2):
        if node.items[i] == NULL:
            _collect_dict(<object>node.items[i + 1], out, thaw)
        elif thaw:
            PyDict_SetItem(out, <object>node.items[i], _thaw(<object>node.items[i + 1], 0))
        else:
            PyDict_SetItem(out, <object>node.items[i], <object>node.items[i + 1])


ctypedef struct _Entry:
    Py_hash_t h
    PyObject* key
    PyObject* value


cdef object _build_trie(dict entries, Py_hash_t mask, unsigned long long owner,
                        Py_ssize_t* count):
    """A new trie of the pairs of `entries` whose value is not _TOMBSTONE,
    built in one pass: the pairs are partitioned by hash bits, level by
    level, and each node is allocated once at its final size. That is the
    shape `_assoc` gives the same keys in any order (one key in a slot is
    inlined, keys of one hash share a collision node), but without the node
    copies and reallocations of a million single inserts, and with the
    memory laid out in trie order."""
    cdef Py_ssize_t n = 0, pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef _Entry* arr
    count[0] = 0
    if len(entries) == 0:
        return None
    arr = <_Entry*>PyMem_Malloc(len(entries) * sizeof(_Entry))
    if arr == NULL:
        raise MemoryError()
    try:
        while PyDict_Next(entries, &pos, &k, &v):
            if v == <PyObject*>_TOMBSTONE:
                continue
            arr[n].h = PyObject_Hash(<object>k) & mask
            arr[n].key = k
            arr[n].value = v
            n += 1
        count[0] = n
        if n == 0:
            return None
        return _build_level(arr, 0, n, 0, owner)
    finally:
        PyMem_Free(arr)


cdef _Node _build_level(_Entry* arr, Py_ssize_t lo, Py_ssize_t hi, unsigned int shift,
                        unsigned long long owner):
    """The bitmap node at `shift` of the distinct keys arr[lo:hi] (at least
    one, and not all of one hash unless at the root). Keys of one hash keep
    no particular order in their collision node."""
    cdef Py_ssize_t counts[_FANOUT]
    cdef Py_ssize_t starts[_FANOUT]
    cdef Py_ssize_t ends[_FANOUT]
    cdef Py_ssize_t i, at = 0, s, e
    cdef unsigned int b, t, slots = 0
    cdef _Entry entry, swap
    cdef _Node node, child
    for b in range(<unsigned int>_FANOUT):
        counts[b] = 0
    for i in range(lo, hi):
        counts[(<unsigned long long>arr[i].h >> shift) & _FANOUT_MASK] += 1
    for b in range(<unsigned int>_FANOUT):
        starts[b] = lo + at
        at += counts[b]
        if counts[b]:
            slots += 1
    # Partition in place by this level's bits (one array: a second one for
    # a copy would be as big, and freed memory of that size stays in RSS).
    for b in range(<unsigned int>_FANOUT):
        ends[b] = starts[b] + counts[b]
    for b in range(<unsigned int>_FANOUT):
        while starts[b] < ends[b]:
            entry = arr[starts[b]]
            t = (<unsigned long long>entry.h >> shift) & _FANOUT_MASK
            while t != b:
                swap = arr[starts[t]]
                arr[starts[t]] = entry
                starts[t] += 1
                entry = swap
                t = (<unsigned long long>entry.h >> shift) & _FANOUT_MASK
            arr[starts[b]] = entry
            starts[b] += 1
    node = _alloc(2 * slots, owner)
    s = lo
    for b in range(<unsigned int>_FANOUT):
        if not counts[b]:
            continue
        e = s + counts[b]
        node.bitmap |= 1u << b
        if e - s == 1:
            _set(node, node.n, <object>arr[s].key)
            _set(node, node.n + 1, <object>arr[s].value)
        else:
            i = s + 1
            while i < e and arr[i].h == arr[s].h:
                i += 1
            if i == e:
                child = _alloc(2 * (e - s), owner)
                child.collision = True
                child.hash = arr[s].h
                for i in range(s, e):
                    _set(child, child.n, <object>arr[i].key)
                    _set(child, child.n + 1, <object>arr[i].value)
                    child.n += 2
            else:
                child = _build_level(arr, s, e, shift + _BITS, owner)
            node.items[node.n] = NULL
            _set(node, node.n + 1, child)
        node.n += 2
        s = e
    return node


def _trie_invariants(MapRef ref not None):
    """Checks the shape of `ref`'s trie and returns its number of keys (for
    tests): bitmaps match slots, every key sits where its hash bits say,
    subtrees hold at least two keys (single keys are inlined in the parent),
    collision nodes hold distinct keys of one hash."""
    _check_ref(ref)
    ref._sync()
    return _check_node(ref._root, 0, 0, ref._map._mask, True)


def _trie_shape(MapRef ref not None):
    """The shape of `ref`'s trie (for tests): a bitmap node as a list of its
    bitmap then, per slot, its key or its child's shape; a collision node as
    the frozenset of its keys."""
    _check_ref(ref)
    ref._sync()
    return _shape_of(ref._root)


cdef object _shape_of(object root):
    cdef _Node node
    if root is None:
        return None
    node = <_Node>root
    if node.collision:
        return frozenset([_key_at(node, i) for i in range(0, node.n, 2)])
    out = [node.bitmap]
    for i in range(0, node.n, 2):
        k = _key_at(node, i)
        out.append(_shape_of(<object>node.items[i + 1]) if k is None else k)
    return out


cdef Py_ssize_t _check_node(object root, unsigned int shift, unsigned long long prefix,
                            Py_hash_t mask, bint is_root) except -1:
    cdef unsigned long long low = (1ULL << shift) - 1 if shift < 64 else <unsigned long long>-1
    cdef unsigned long long h
    cdef unsigned int b
    cdef Py_ssize_t n = 0, j = 0
    cdef _Node node
    if root is None:
        assert is_root, "empty subtree"
        return 0
    node = <_Node>root
    assert node.n <= node.cap, "node overflow"
    if node.collision:
        assert node.n >= 4, "collision node with fewer than two keys"
        keys = [_key_at(node, i) for i in range(0, node.n, 2)]
        assert None not in keys, "child in a collision node"
        assert len(set(keys)) == len(keys), "duplicate key in a collision node"
        for k in keys:
            assert PyObject_Hash(k) & mask == node.hash, "collision hash mismatch"
        assert <unsigned long long>node.hash & low == prefix, "misplaced collision"
        return len(keys)
    assert node.n == 2 * __builtin_popcount(node.bitmap), "bitmap/slots mismatch"
    assert is_root or not _is_single_leaf(node), "single key left in a subtree"
    for b in range(<unsigned int>_FANOUT):
        if not (node.bitmap & (1u << b)):
            continue
        k = _key_at(node, j)
        v = <object>node.items[j + 1]
        j += 2
        if k is None:
            assert isinstance(v, _Node), "child slot without a node"
            n += _check_node(v, shift + _BITS, prefix | (<unsigned long long>b << shift), mask,
                             False)
        else:
            h = <unsigned long long>(PyObject_Hash(k) & mask)
            assert (h >> shift) & _FANOUT_MASK == b and h & low == prefix, f"key {k!r} misplaced"
            n += 1
    return n


@cython.final
@cython.auto_pickle(False)
cdef class _TrieIter:
    """Iterator over a trie: keys (mode 0), values (1) or items (2)."""
    cdef list _nodes            # the nodes on the current path (kept alive)
    cdef Py_ssize_t _pos[_STACK]
    cdef int _top
    cdef int _mode
    cdef Py_ssize_t _left

    def __init__(self):
        raise TypeError("cannot create this iterator directly")

    def __iter__(self):
        return self

    def __length_hint__(self):
        return self._left

    def __next__(self):
        cdef _Node node
        cdef Py_ssize_t i
        cdef object v
        if self._nodes is None:
            raise TypeError("this iterator was never initialised: iterate a MapRef or a view")
        while self._top >= 0:
            node = <_Node>PyList_GET_ITEM(self._nodes, self._top)
            i = self._pos[self._top]
            if i >= node.n:
                self._nodes.pop()
                self._top -= 1
                continue
            self._pos[self._top] = i + 2
            v = <object>node.items[i + 1]
            if node.items[i] == NULL:
                self._top += 1
                self._pos[self._top] = 0
                self._nodes.append(v)
                continue
            self._left -= 1
            if self._mode == 0:
                return <object>node.items[i]
            if self._mode == 1:
                return v
            return (<object>node.items[i], v)
        raise StopIteration


cdef _TrieIter _iter_trie(object root, Py_ssize_t count, int mode):
    cdef _TrieIter it = _TrieIter.__new__(_TrieIter)
    it._mode = mode
    it._left = count
    it._nodes = []
    if root is None:
        it._top = -1
    else:
        it._top = 0
        it._pos[0] = 0
        it._nodes.append(root)
    return it


# ---------------------------------------------------------------------------
# Snapshots, history
# ---------------------------------------------------------------------------

@cython.final
@cython.auto_pickle(False)
cdef class _Snapshot:
    """One committed version: its trie, size, version and history window.
    `index` is the plain dict of the newest version (None once superseded)."""
    cdef object root
    cdef Py_ssize_t count
    cdef long long version
    cdef dict index
    cdef list hist
    cdef Py_ssize_t hist_lo
    cdef Py_ssize_t hist_hi


cdef _Snapshot _empty_snapshot():
    cdef _Snapshot s = _Snapshot.__new__(_Snapshot)
    s.root = None
    s.count = 0
    s.version = 0
    s.index = {}
    s.hist = []
    s.hist_lo = 0
    s.hist_hi = 0
    return s


cdef int _apply_to_index(dict index, list removes, list adds, Py_ssize_t n_adds) except -1:
    """Applies the removes and the first `n_adds` items of `adds` (pairs)."""
    cdef Py_ssize_t i, n = 0
    cdef PyObject* keys[_BATCH]
    cdef Py_hash_t hashes[_BATCH]
    # Small change sets (the common case) get their entries loaded at once.
    if len(removes) + n_adds // 2 <= _BATCH:
        for k in removes:
            keys[n] = <PyObject*>k
            hashes[n] = PyObject_Hash(k)
            n += 1
        for i in range(0, n_adds, 2):
            keys[n] = PyList_GET_ITEM(adds, i)
            hashes[n] = PyObject_Hash(<object>keys[n])
            n += 1
        caf_load_dict_entries(<PyObject*>index, keys, hashes, n)
    for k in removes:
        if PyDict_GetItem(index, k) != NULL:
            PyDict_DelItem(index, k)
    for i in range(0, n_adds, 2):
        PyDict_SetItem(index, <object>PyList_GET_ITEM(adds, i),
                       <object>PyList_GET_ITEM(adds, i + 1))
    return 0


# ---------------------------------------------------------------------------
# Change sets
# ---------------------------------------------------------------------------

cdef tuple _FIELDS = ("version", "remove", "add")


cdef long long _parse_base(object v, str where) except -1:
    """The 'version' of a change set: the version it applies to (0: a dump)."""
    if type(v) is not int:
        raise InvalidChangeSetError(
            f"{where} 'version' must be an int, got {v!r} ({_type_name(v)})")
    # The version it makes, v + 1, must stay below the limit as well.
    if v < 0 or v >= _VERSION_LIMIT - 1:
        raise InvalidChangeSetError(
            f"{where} 'version' must be in [0, 2**53 - 1) (versions stay below 2**53), "
            f"got {v!r}")
    return v


cdef long long _parse_made(object v, long long base, str where) except -1:
    """The value of the version pair: exactly base + 1 for a change set, and
    in [0, 2**53) for a dump (0: the empty map, see _check_dump). Anything
    else would let one message move a replica anywhere, for good (versions
    never go back)."""
    if type(v) is not int:
        raise InvalidChangeSetError(
            f"{where} {_VERSION_KEY!r} must be an int, got {v!r} ({_type_name(v)})")
    if base == 0:
        if v < 0 or v >= _VERSION_LIMIT:
            raise InvalidChangeSetError(
                f"{where} is a dump (version 0): its {_VERSION_KEY!r} must be in "
                f"[0, 2**53), got {v!r}")
    elif v != base + 1:
        raise InvalidChangeSetError(
            f"{where} {_VERSION_KEY!r} must be its 'version' + 1 = {base + 1}, got {v!r}")
    return v


cdef str _change_key(object key, str where, str field, Py_ssize_t i):
    """`key`, found at where[field][i], as an exact str. The location is
    formatted only for an error: this runs for every key applied."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise InvalidChangeSetError(
                f"{where} {field!r}[{i}] must be a str key, got {key!r} ({_type_name(key)})")
        key = PyUnicode_FromObject(key)
    try:
        _check_str(<str>key)
    except _PathError as err:
        raise InvalidChangeSetError(
            f"{where} {field!r}[{i}] key {key!r}: {(<_PathError>err).reason}") from None
    return key


cdef void _prefetch_edits(PyObject* root, list removes, list adds, Py_hash_t mask,
                          dict index, unsigned long long owner):
    """_prefetch_paths for the keys of a change set, a batch at a time."""
    cdef Py_hash_t hashes[_BATCH]
    cdef Py_ssize_t n = 0, i
    cdef PyObject* ix = NULL if index is None else <PyObject*>index
    for k in removes:
        hashes[n] = PyObject_Hash(k) & mask
        n += 1
        if n == _BATCH:
            _prefetch_paths(root, hashes, n, ix, owner)
            n = 0
    for i in range(0, len(adds), 2):
        hashes[n] = PyObject_Hash(adds[i]) & mask
        n += 1
        if n == _BATCH:
            _prefetch_paths(root, hashes, n, ix, owner)
            n = 0
    if n:
        _prefetch_paths(root, hashes, n, ix, owner)


@cython.final
@cython.auto_pickle(False)
cdef class _Parsed:
    """A validated change set: keys are exact str, values deep-frozen, the
    version pair taken out of `adds` (into `new_version`)."""
    cdef long long version
    cdef long long new_version
    cdef list removes
    cdef list adds
    cdef list extras            # other fields, alternating names and frozen values; or None
    cdef object record


cdef _Parsed _parse_change_set(object c, str where):
    if not isinstance(c, dict):
        raise InvalidChangeSetError(
            f"{where} must be a dict, got {_type_name(c)}")
    for field in _FIELDS:
        if field not in c:
            raise InvalidChangeSetError(f"{where} has no {field!r} field")
    cdef _Parsed p = _Parsed.__new__(_Parsed)
    if len(c) != 3:
        p.extras = _parse_extras(c, where)
    p.version = _parse_base(c["version"], where)
    remove = c["remove"]
    add = c["add"]
    if not isinstance(remove, (list, tuple)):
        raise InvalidChangeSetError(
            f"{where} 'remove' must be a list, got {_type_name(remove)}")
    if not isinstance(add, (list, tuple)):
        raise InvalidChangeSetError(f"{where} 'add' must be a list, got {_type_name(add)}")
    if len(add) % 2:
        raise InvalidChangeSetError(
            f"{where} 'add' must alternate keys and values (even length), got {len(add)} items")
    cdef list removes = []
    cdef list adds = []
    cdef Py_ssize_t i, n = len(add)
    cdef long long nv = -1       # the version pair's value; -1 until found
    cdef str key
    for i, key_obj in enumerate(remove):
        key = _change_key(key_obj, where, "remove", i)
        if key == _VERSION_KEY:
            raise InvalidChangeSetError(f"{where} 'remove'[{i}] removes the reserved key "
                                        f"{_VERSION_KEY!r}")
        removes.append(key)
    for i in range(0, n, 2):
        key = _change_key(add[i], where, "add", i)
        value = add[i + 1]
        if key == _VERSION_KEY:
            if nv >= 0:
                raise InvalidChangeSetError(
                    f"{where} 'add'[{i}] holds {_VERSION_KEY!r} a second time")
            nv = _parse_made(value, p.version, where)
            continue
        try:
            value = _freeze(value, 0)
        except _PathError as err:
            raise InvalidChangeSetError(
                str(_public_error(<_PathError>err, f"{where} 'add'[{i + 1}] value for key {key!r}"))
            ) from None
        adds.append(key)
        adds.append(value)
    if nv < 0:
        # prepare() and Caf.js always send the pair; without it a change set
        # still makes version + 1, but a dump would have no version at all.
        if p.version == 0:
            raise InvalidChangeSetError(
                f"{where} is a dump (version 0) without a {_VERSION_KEY!r} pair in 'add': "
                "it must say its version, in [0, 2**53)")
        nv = p.version + 1
    elif p.version == 0:
        _check_dump(nv, removes, adds, where)
    p.new_version = nv
    p.removes = removes
    p.adds = adds
    # A sealed FrozenDict of sealed FrozenLists is deep-frozen already: it is
    # recorded as it is.
    if (type(c) is FrozenDict and (<FrozenDict>c)._sealed
            and type(remove) is FrozenList and (<FrozenList>remove)._sealed
            and type(add) is FrozenList and (<FrozenList>add)._sealed):
        p.record = c
    return p


cdef int _check_dump(long long made, list removes, list adds, str where) except -1:
    """The content rules of a dump. Version 0 making version 1 is also the
    first change set of a map, whose removes are no-ops on the empty map;
    a later dump lists the whole content, so a remove there is a malformed
    message. A dump of version 0 is the empty map that every map starts as
    (what a peer sends for a map created without content): it holds nothing."""
    if made == 0 and adds:
        raise InvalidChangeSetError(
            f"{where} is a dump of version 0, the empty map, but adds {len(adds) // 2} keys")
    if removes and made != 1:
        raise InvalidChangeSetError(
            f"{where} is a dump (version 0) of version {made}: it must not remove keys, "
            f"got {len(removes)} in 'remove'")
    return 0


cdef list _parse_extras(object c, str where):
    """The fields of `c` besides version/remove/add (lineage, DESIGN section
    9; Caf.js ignores them), frozen so that the recorded change set keeps
    them."""
    cdef list extras = []
    for field, value in c.items():
        if not isinstance(field, str):
            raise InvalidChangeSetError(
                f"{where} has a field {field!r} whose name is not a str")
        if field in _FIELDS:
            continue
        if field in ("txid", "base_txid") and value is not None and \
                not (isinstance(value, str) and 0 < len(<str>value) <= 64):
            raise InvalidChangeSetError(
                f"{where} {field!r} must be None or a str of 1-64 characters")
        try:
            value = _freeze(value, 1)
        except _PathError as err:
            raise InvalidChangeSetError(
                str(_public_error(<_PathError>err, f"{where} field {field!r}"))) from None
        extras.append(PyUnicode_FromObject(field))
        extras.append(value)
    return extras


cdef FrozenDict _record_of(_Parsed p):
    if p.record is not None:
        return <FrozenDict>p.record
    cdef list add = list(p.adds)
    add.append(_VERSION_KEY)
    add.append(p.new_version)
    cdef FrozenDict out = _frozen_change_set(p.version, _frozen_list_of(p.removes, 1),
                                             _frozen_list_of(add, _pairs_height(add)))
    cdef Py_ssize_t i
    if p.extras is not None:
        for i in range(0, len(p.extras), 2):
            PyDict_SetItem(out, p.extras[i], p.extras[i + 1])
            out._height = max(out._height, _height(p.extras[i + 1]) + 1)
    return out


# ---------------------------------------------------------------------------
# SharedMap
# ---------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class SharedMap:
    """A versioned, single-writer map of JSON data with snapshot refs.

    ``SharedMap(*, no_exec=False, max_updates=100, logger=None,
    method_limits=None, name=None)``: `no_exec` disables serialized methods,
    `max_updates` bounds the change sets kept for ``updates_slice`` (0 keeps
    none), `logger` gets ``debug()`` calls for ignored replays, and
    `method_limits` (a ``caf_sharing.methods.MethodLimits``, None for the
    defaults) is the budget of each method call on this map's refs, and
    `name` (the map's full name, or None) is named by the ReadOnlyError of a
    write through one of its read-only refs.
    """
    cdef _Snapshot _cur
    cdef readonly object name
    cdef bint _no_exec
    cdef object _method_limits
    cdef Py_ssize_t _max_updates
    cdef object _logger
    cdef Py_hash_t _mask  # bits of hash() the trie uses: all but in collision tests

    def __init__(self, *, bint no_exec=False, max_updates=100, logger=None,
                 method_limits=None, name=None):
        if self._cur is not None:
            # It would reset the map under its refs and could turn no_exec off.
            raise TypeError("SharedMap is already initialised: __init__ runs once")
        self._max_updates = _check_max_updates(max_updates)
        if method_limits is not None:
            from caf_sharing import methods
            methods.check_limits(method_limits)
        self._method_limits = method_limits
        self._no_exec = no_exec
        self._logger = logger
        self.name = name
        self._mask = -1
        self._cur = _empty_snapshot()

    @property
    def version(self) -> int:
        _check_map(self)
        return self._cur.version

    @property
    def no_exec(self) -> bool:
        _check_map(self)
        return self._no_exec

    @property
    def max_updates(self) -> int:
        _check_map(self)
        return self._max_updates

    @property
    def method_limits(self):
        """The MethodLimits given at creation, or None (the defaults)."""
        return self._method_limits

    @max_updates.setter
    def max_updates(self, value):
        _check_map(self)
        # Takes effect when the next change set is recorded.
        self._max_updates = _check_max_updates(value)

    def __repr__(self):
        if self._cur is None:
            return "<SharedMap (never initialised)>"
        return (f"SharedMap(version={self._cur.version}, keys={self._cur.count}, "
                f"no_exec={bool(self._no_exec)}, max_updates={self._max_updates})")

    @cython.binding(False)
    def ref(self, bint read_only=False):
        """An O(1) snapshot of the current version."""
        _check_map(self)
        cdef MapRef r = MapRef.__new__(MapRef)
        r._map = self
        r._mask = self._mask
        r._base = self._cur
        r._root = self._cur.root
        r._count = self._cur.count
        r._read_only = read_only
        r._replica = read_only
        return r

    def commit(self, MapRef ref not None):
        """Makes the prepared `ref` the current version (its version + 1)."""
        _check_map(self)
        _check_ref(ref)
        if ref._map is not self:
            raise ValueError("commit(): the ref belongs to another SharedMap")
        if ref._changes is None or ref._edits is None:
            raise PrepareRequiredError(
                "commit() needs a ref that was prepared with changes "
                f"(prepared: {ref._changes is not None}, changed: {ref._edits is not None})")
        cdef _Snapshot cur = self._cur
        if ref._base is not cur:
            if ref._base.version == cur.version:
                msg = (f"the map was reset since the ref was taken at version "
                       f"{ref._base.version}")
            else:
                msg = (f"the map moved from version {ref._base.version} to {cur.version} "
                       "since the ref was taken")
            raise ConcurrentUpdateError(msg, expected=ref._base.version, current=cur.version)
        cdef FrozenDict changes = <FrozenDict>ref._changes
        cdef list adds = <list>dict.__getitem__(changes, "add")
        # Allocated before the trie edits, which may go in place: from those
        # until the map moves to `nxt`, nothing may allocate what could run
        # the cycle GC and with it a finalizer that takes a ref of `cur`.
        cdef list removes = <list>dict.__getitem__(changes, "remove")
        cdef _Snapshot nxt = self._successor(cur.version + 1)
        ref._commit_sync(cur, nxt.index)
        nxt.root = ref._root
        nxt.count = ref._count
        if len(nxt.index) == 0 and len(removes) == 0:
            # The first content of the map: the ref's edits are exactly the
            # new index, so they become it rather than be copied into it.
            # (Its base was empty, so nothing was edited in place above: the
            # allocations this makes cannot expose a half-made version.)
            nxt.index = ref._hand_over_edits(cur)
        else:
            # The wire "add" ends with the version pair, which is not content.
            _apply_to_index(nxt.index, removes, adds, len(adds) - 2)
        self._cur = nxt
        if self._keeps(nxt, len(adds) // 2 - 1 + len(removes)):
            self._record(nxt, changes)

    cdef _Snapshot _successor(self, long long version):
        """The next current snapshot, still without its trie; the index moves
        over from the old one."""
        cdef _Snapshot cur = self._cur
        cdef _Snapshot nxt = _Snapshot.__new__(_Snapshot)
        nxt.root = None
        nxt.count = 0
        nxt.version = version
        nxt.index = cur.index
        cur.index = None
        nxt.hist = cur.hist
        nxt.hist_lo = cur.hist_lo
        nxt.hist_hi = cur.hist_hi
        return nxt

    cdef bint _keeps(self, _Snapshot s, Py_ssize_t changed):
        """Whether the change set of `changed` keys that made `s` goes into
        its history. One of more than _BIG_CHANGE keys and no smaller than
        the map it made is not kept (the history restarts): a dump serves
        its readers as well, and it would hold a second list of every key of
        a map built in one commit for the next max_updates commits."""
        if changed > _BIG_CHANGE and changed >= s.count:
            s.hist_lo = s.hist_hi
            return False
        return True

    cdef void _record(self, _Snapshot s, FrozenDict entry):
        cdef list hist = s.hist
        cdef Py_ssize_t lo = s.hist_lo, hi = s.hist_hi
        if self._max_updates == 0:
            s.hist_lo = s.hist_hi
            return
        hist.append(entry)
        hi += 1
        if hi - lo > self._max_updates:
            lo = hi - self._max_updates
        if lo > 64 and lo > hi - lo:
            # Older windows keep the old list; the new one drops the dead prefix.
            hist = hist[lo:hi]
            hi -= lo
            lo = 0
        s.hist = hist
        s.hist_lo = lo
        s.hist_hi = hi

    def apply_changes(self, changes):
        """Applies one change set (dict) or a list of them, in order. A list
        is applied whole or not at all: every change set in it is checked,
        and the versions chained, before the map changes."""
        _check_map(self)
        cdef _Parsed p
        if isinstance(changes, (list, tuple)):
            self._apply_list(changes)
            return
        p = _parse_change_set(changes, "change set")
        if self._plan(p, self._cur.version, -1):
            self._apply_parsed(p)
        elif self._logger is not None:
            self._log_ignored(p, self._cur.version)

    cdef int _apply_list(self, object changes) except -1:
        cdef list parsed = []
        cdef list ignored = []       # (change set, map version then) to log
        cdef list apply = []
        cdef long long current = self._cur.version
        cdef Py_ssize_t i = 0
        cdef _Parsed p
        for c in changes:
            parsed.append(_parse_change_set(c, f"change set [{i}]"))
            i += 1
        for i in range(len(parsed)):
            p = <_Parsed>parsed[i]
            if self._plan(p, current, i):
                apply.append(p)
                current = p.new_version
            else:
                ignored.append((p, current))
        # Nothing below can fail on the content: it was all checked above.
        for p in apply:
            self._apply_parsed(p)
        if self._logger is not None:
            for p, current in ignored:
                self._log_ignored(p, current)
        return 0

    cdef int _plan(self, _Parsed p, long long current, Py_ssize_t index) except -1:
        """Whether `p` applies to the map at version `current`. An old change
        set, or a dump no newer than the map, is ignored (replays are
        idempotent and versions never go back); a newer change set is a gap
        (MissedUpdateError)."""
        if p.version == 0:
            return p.new_version > current
        if p.version < current:
            return False
        if p.version > current:
            if index < 0:
                msg = (f"change set has version {p.version} but the map is at version "
                       f"{current}: updates were missed (resync from a dump)")
            else:
                msg = (f"change set [{index}] has version {p.version} but the ones before it "
                       f"end at version {current}: updates were missed (nothing applied; "
                       "resync from a dump)")
            raise MissedUpdateError(msg, version=p.version, current=self._cur.version)
        return True

    cdef int _log_ignored(self, _Parsed p, long long current) except -1:
        if p.version == 0:
            self._logger.debug("SharedMap: ignoring a dump of version %d (map at version %d)",
                               p.new_version, current)
        else:
            self._logger.debug(
                "SharedMap: ignoring an old change set of version %d (map at version %d)",
                p.version, current)
        return 0

    cdef int _apply_parsed(self, _Parsed p) except -1:
        if p.version == 0:
            self._load_dump(p)
        else:
            self._apply_change(p)
        return 0

    cdef int _apply_change(self, _Parsed p) except -1:
        """Applies a checked change set based on the current version."""
        cdef _Snapshot cur = self._cur
        cdef unsigned long long owner = _new_owner()
        cdef object root = cur.root
        cdef Py_ssize_t count = cur.count, i
        cdef int flag
        cdef str k
        # Allocated first, as in commit (the edits below may go in place).
        cdef _Snapshot nxt = self._successor(p.new_version)
        # Held by the map and the local above only, and its root by it and
        # the local `root` only: no one can see this version again, so its
        # trie is edited in place (as in MapRef._commit_sync).
        if (root is not None and Py_REFCNT(<PyObject*>cur) == 2
                and Py_REFCNT(<PyObject*>root) == 2):
            (<_Node>root).owner = owner
        _prefetch_edits(_root_ptr(root), p.removes, p.adds, self._mask, nxt.index, owner)
        for k in p.removes:
            flag = 0
            root = _without(root, 0, PyObject_Hash(k) & self._mask, k, owner, &flag)
            count -= flag
        for i in range(0, len(p.adds), 2):
            k = <str>p.adds[i]
            flag = 0
            root = _assoc(root, 0, PyObject_Hash(k) & self._mask, k, p.adds[i + 1], owner,
                          self._mask, &flag)
            count += flag
        nxt.root = root
        nxt.count = count
        _apply_to_index(nxt.index, p.removes, p.adds, len(p.adds))
        self._cur = nxt
        if self._keeps(nxt, len(p.adds) // 2 + len(p.removes)):
            self._record(nxt, _record_of(p))
        return 0

    cdef int _load_dump(self, _Parsed p) except -1:
        """Replaces the content by a newer dump. History cannot bridge the
        jump, so it restarts empty."""
        cdef Py_ssize_t count = 0, i
        cdef list adds = p.adds
        # The index first: it keeps the last value of a key listed twice,
        # and the trie is then built from it whole (_build_trie). (Not
        # presized: CPython caps that, and the dict then grows past the
        # size inserts alone give it, 10 MB more at 1M keys.)
        cdef dict index = {}
        for i in range(0, len(adds), 2):
            PyDict_SetItem(index, <object>PyList_GET_ITEM(adds, i),
                           <object>PyList_GET_ITEM(adds, i + 1))
        root = _build_trie(index, self._mask, _new_owner(), &count)
        cdef _Snapshot nxt = _empty_snapshot()
        nxt.root = root
        nxt.count = count
        nxt.version = p.new_version
        nxt.index = index
        self._cur.index = None
        self._cur = nxt
        return 0

    def reset(self):
        """Back to an empty version-0 map with no history. Refs taken before
        keep their snapshot but can no longer commit."""
        _check_map(self)
        self._cur.index = None
        self._cur = _empty_snapshot()


def _map_with_hash_bits(int bits, **kwargs):
    """A SharedMap whose trie uses only the low `bits` bits of each key's
    hash. Tests use it to force full-hash collisions and deep paths, which
    real 64-bit str hashes practically never produce."""
    if not 0 <= bits <= 64:
        raise ValueError(f"bits must be in [0, 64], got {bits}")
    cdef SharedMap m = SharedMap(**kwargs)
    m._mask = -1 if bits == 64 else <Py_hash_t>((1ULL << bits) - 1)
    return m


cdef inline int _check_map(SharedMap m) except -1:
    """Refuses a SharedMap made by __new__ alone: it has no version at all."""
    if m._cur is None:
        raise TypeError("SharedMap was never initialised (made by __new__ without "
                        "SharedMap(...))")
    return 0


cdef inline int _check_ref(MapRef r) except -1:
    """Refuses a MapRef made by __new__ alone: it belongs to no map."""
    if r._base is None:
        raise TypeError("MapRef was never initialised: refs are made by SharedMap.ref()")
    return 0


cdef Py_ssize_t _check_max_updates(object value) except -1:
    if type(value) is not int or value < 0:
        raise ValueError(f"max_updates must be an int >= 0, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# MapRef
# ---------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class MapRef:
    """A snapshot of one version of a SharedMap, with read-your-writes edits.

    Made by :meth:`SharedMap.ref`; not constructible directly.
    """
    cdef SharedMap _map
    cdef _Snapshot _base
    cdef object _root          # the trie of base + edits, once _pending is synced
    cdef Py_ssize_t _count     # its size, likewise
    cdef Py_hash_t _mask        # the map's, copied for the read path
    cdef dict _edits           # key -> value or _TOMBSTONE; None until the first edit
    cdef list _pending         # edited keys not yet in _root; None when synced
    cdef bint _all_pending     # every key of _edits is pending (_pending unused)
    cdef bint _read_only
    cdef bint _replica         # taken with read_only=True
    cdef object _changes       # the prepared change set
    cdef unsigned long long _owner

    def __init__(self, *args, **kwargs):
        raise TypeError("MapRef cannot be created directly: use SharedMap.ref()")

    # -- reads ---------------------------------------------------------------

    cdef inline object _lookup(self, object key):
        """The value of `key` or _MISSING; non-str keys are never present
        (but must be hashable, like dict keys)."""
        cdef dict index
        cdef PyObject* p
        _check_ref(self)
        if type(key) is not str:
            if not isinstance(key, str):
                _check_hashable(key)
                return _MISSING
            key = PyUnicode_FromObject(key)
        if self._edits is not None:
            p = PyDict_GetItem(self._edits, key)
            if p != NULL:
                return _MISSING if p == <PyObject*>_TOMBSTONE else <object>p
        index = self._base.index
        if index is not None:
            p = PyDict_GetItem(index, key)
        else:
            p = _find(_root_ptr(self._base.root), <str>key, PyObject_Hash(key) & self._mask)
        return <object>p if p != NULL else _MISSING

    # binding(False): a plain method descriptor, so `ref.get` binds and calls
    # like `dict.get` (a bound cyfunction costs an extra call layer).
    @cython.binding(False)
    def get(self, key, default=None, /):
        """The value of `key`, or `default`."""
        cdef dict index
        cdef PyObject* p
        _check_ref(self)
        if type(key) is str:
            # The ref's own edits first; the rest is the base version's
            # content, in the index while that version is the newest.
            if self._edits is not None:
                p = PyDict_GetItem(self._edits, key)
                if p != NULL:
                    return default if p == <PyObject*>_TOMBSTONE else <object>p
            index = self._base.index
            if index is not None:
                p = PyDict_GetItem(index, key)
                return <object>p if p != NULL else default
            p = _find(_root_ptr(self._base.root), <str>key, PyObject_Hash(key) & self._mask)
            return <object>p if p != NULL else default
        v = self._lookup(key)
        return default if v is _MISSING else v

    def __getitem__(self, key):
        v = self._lookup(key)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def __contains__(self, key):
        return self._lookup(key) is not _MISSING

    def __len__(self):
        _check_ref(self)
        self._sync()
        return self._count

    cdef int _sync(self) except -1:
        """Brings the pending edits into the ref's trie. Edits wait for this
        (len, iteration, views, dump, commit) so that their paths are
        fetched together, see _prefetch_paths; reads do not need the trie."""
        # The index the commit of these edits will update, while it may.
        return self._sync_for(self._base.index)

    cdef int _sync_for(self, dict index) except -1:
        """_sync, also fetching the slots of `index` (a dict or None) that
        the edits will update."""
        cdef Py_ssize_t pos = 0, n = 0, count = 0
        cdef PyObject* keys[_BATCH]
        cdef PyObject* value
        if self._owner == 0 and (self._all_pending or self._pending is not None):
            self._owner = _new_owner()
        if self._all_pending:
            self._all_pending = False
            if self._root is None:
                # Edits of an empty map (its first content, typically):
                # built whole, as a loaded dump is.
                self._root = _build_trie(self._edits, self._mask, self._owner, &count)
                self._count = count
                return 0
            while PyDict_Next(self._edits, &pos, &keys[n], &value):
                n += 1
                if n == _BATCH:
                    self._sync_batch(keys, n, index)
                    n = 0
            self._sync_batch(keys, n, index)
            return 0
        if self._pending is None:
            return 0
        for pos in range(0, len(self._pending), _BATCH):
            n = min(_BATCH, len(self._pending) - pos)
            for count in range(n):
                keys[count] = PyList_GET_ITEM(self._pending, pos + count)
            self._sync_batch(keys, n, index)
        self._pending = None
        return 0

    cdef int _sync_batch(self, PyObject** keys, Py_ssize_t n, dict index) except -1:
        """Brings the edits of `keys` (at most _BATCH, in _edits) into the
        trie, their paths fetched together first (see _prefetch_paths)."""
        cdef Py_hash_t hashes[_BATCH]
        cdef Py_ssize_t j
        cdef int flag
        cdef str key
        if n == 0:
            return 0
        for j in range(n):
            hashes[j] = PyObject_Hash(<str>keys[j]) & self._mask
        _prefetch_paths(_root_ptr(self._root), hashes, n,
                        NULL if index is None else <PyObject*>index, self._owner)
        for j in range(n):
            key = <str>keys[j]
            value = <object>PyDict_GetItem(self._edits, key)
            flag = 0
            if value is _TOMBSTONE:
                self._root = _without(self._root, 0, hashes[j], key, self._owner, &flag)
                self._count -= flag
            else:
                self._root = _assoc(self._root, 0, hashes[j], key, value, self._owner,
                                    self._mask, &flag)
                self._count += flag
        return 0

    cdef int _commit_sync(self, _Snapshot cur, dict index) except -1:
        """Syncs a prepared ref that `commit` is about to make the map's
        version; `cur` is that version (the ref's base), held by commit, and
        `index` the map's index (already taken from `cur`). Afterwards the
        ref's trie is frozen: it is the map's.

        When nothing but the map, this ref and commit's local hold `cur`, and
        nothing but `cur` and this ref hold its root, no other reader can ever
        see the base trie again: the edits then go into it in place (unshared
        nodes are claimed, see _prefetch_paths) instead of copying every path
        and freeing the old one, and `cur`, now seen only by this ref,
        follows the new content. Any other holder (a ref, view or iterator of
        the base version, or a version sharing a node) keeps that part copied."""
        cdef bint in_place = False
        if ((self._all_pending or self._pending is not None) and self._root is not None
                and self._root is cur.root):
            in_place = (Py_REFCNT(<PyObject*>cur) == 3
                        and Py_REFCNT(<PyObject*>self._root) == 2)
            if in_place:
                self._owner = _new_owner()
                (<_Node>self._root).owner = self._owner
        self._sync_for(index)
        self._owner = 0
        if in_place:
            cur.root = self._root
            cur.count = self._count
        return 0

    cdef dict _hand_over_edits(self, _Snapshot base):
        """The edits dict, given to the map as its index by the commit of
        this ref (`base` is its version). The ref then reads its own trie,
        through a snapshot of its own at the same version: the index moves
        on with the map."""
        cdef dict edits = self._edits
        cdef _Snapshot own = _Snapshot.__new__(_Snapshot)
        own.root = self._root
        own.count = self._count
        own.version = base.version
        own.index = None
        own.hist = base.hist
        own.hist_lo = base.hist_lo
        own.hist_hi = base.hist_hi
        self._base = own
        self._edits = {}
        return edits

    cdef object _escape_root(self):
        """The root, for something that reads it later (iterators, views):
        edits from now on must copy nodes rather than mutate them."""
        _check_ref(self)
        self._sync()
        self._owner = 0
        return self._root

    def __iter__(self):
        root = self._escape_root()
        return _iter_trie(root, self._count, 0)

    def keys(self):
        """A view of the keys (trie order)."""
        return _make_view(_KeysView, self)

    def values(self):
        """A view of the values (trie order)."""
        return _make_view(_ValuesView, self)

    def items(self):
        """A view of the (key, value) pairs (trie order)."""
        return _make_view(_ItemsView, self)

    def to_dict(self):
        """A plain, mutable deep copy of the user keys."""
        cdef dict out = {}
        _check_ref(self)
        self._sync()
        _collect_dict(self._root, out, True)
        return out

    @property
    def version(self) -> int:
        """The version this ref was taken at."""
        _check_ref(self)
        return self._base.version

    @property
    def is_read_only(self) -> bool:
        _check_ref(self)
        return self._read_only

    @property
    def has_changed(self) -> bool:
        _check_ref(self)
        return self._edits is not None

    @property
    def changes(self):
        """The change set made by prepare(), or None before it."""
        _check_ref(self)
        return self._changes

    def __repr__(self):
        if self._base is None:
            return "<MapRef (never initialised)>"
        self._sync()
        return (f"<MapRef version={self._base.version} keys={self._count} "
                f"read_only={bool(self._read_only)} changed={self._edits is not None}>")

    # -- writes --------------------------------------------------------------

    cdef int _check_writable(self, object key, str action) except -1:
        _check_ref(self)
        if self._read_only:
            if self._changes is not None:
                raise ReadOnlyError(f"cannot {action} {key!r}: it was already prepared")
            raise ReadOnlyError(f"cannot {action} {key!r}: it is read-only",
                                map_name=self._map.name)
        return 0

    cdef int _put(self, str key, object value) except -1:
        if self._edits is None:
            # Until the first sync every edited key is pending: no list of
            # them is kept (a million sets would hold a million more items).
            self._edits = {}
            self._all_pending = True
        PyDict_SetItem(self._edits, key, value)
        if not self._all_pending:
            if self._pending is None:
                self._pending = []
            PyList_Append(self._pending, key)
        return 0

    @cython.binding(False)
    def set(self, key, value):
        """Sets `key` to a deep-frozen copy of `value`; returns this ref."""
        self._check_writable(key, "set")
        cdef str k = _check_key(key, "set")
        self._put(k, _freeze_value(k, value))
        return self

    @cython.binding(False)
    def delete(self, key):
        """Deletes `key` (absent keys too: the delete is still sent)."""
        self._check_writable(key, "delete")
        cdef str k = _check_key(key, "delete")
        self._put(k, _TOMBSTONE)
        return self

    def set_fun(self, name, args, body):
        """Stores a serialized method `name(self, *args)` with source `body`."""
        self._check_writable(name, "set")
        cdef str k = _check_key(name, "set")
        from caf_sharing import methods
        methods.check_method(k, args, body, self._map._method_limits)
        desc = {"type": _FUNCTION_MARKER, "args": list(args), "body": body}
        self._put(k, _freeze_value(k, desc))
        return self

    def apply_method(self, name, args):
        """Runs the serialized method stored under `name` with `args`."""
        _check_ref(self)
        if self._map._no_exec:
            raise NoExecError(
                f"cannot apply method {name!r}: serialized methods are disabled (no_exec)")
        desc = self._lookup(name)
        if type(desc) is not FrozenDict or dict.get(desc, "type") != _FUNCTION_MARKER:
            raise UnknownMethodError(f"unknown method {name!r}: no serialized method there")
        from caf_sharing import methods
        return methods.call_method(self, name, desc, args, self._map._method_limits)

    def prepare(self):
        """The normalised change set of this ref's edits; the ref becomes
        read-only. Also available afterwards as `changes`."""
        _check_ref(self)
        if self._read_only:
            why = "it was already prepared" if self._changes is not None else "it is read-only"
            raise ReadOnlyError(f"cannot prepare: {why}")
        if self._base.version >= _VERSION_LIMIT - 1:
            raise InvalidChangeSetError(
                f"cannot prepare: the map is at version {self._base.version}, the last one "
                "(versions stay below 2**53)")
        # Built in place: the edits are frozen already.
        cdef FrozenList remove = FrozenList.__new__(FrozenList)
        cdef FrozenList add = FrozenList.__new__(FrozenList)
        cdef int h = 0, ch
        if self._edits is not None:
            caf_list_reserve(add, 2 * len(self._edits) + 2)
            for k, v in self._edits.items():
                if v is _TOMBSTONE:
                    PyList_Append(remove, k)
                else:
                    PyList_Append(add, k)
                    PyList_Append(add, v)
                    ch = _height(v)
                    if ch > h:
                        h = ch
        PyList_Append(add, _VERSION_KEY)
        PyList_Append(add, self._base.version + 1)
        remove._height = 1
        add._height = h + 1
        remove._sealed = True
        _untrack(remove)
        add._sealed = True
        _untrack(add)
        self._changes = _frozen_change_set(self._base.version, remove, add)
        self._read_only = True
        return self._changes

    def dump(self):
        """The full change set (version 0) of this snapshot."""
        cdef list add = []
        _check_ref(self)
        self._sync()
        _collect_pairs(self._root, add)
        add.append(_VERSION_KEY)
        add.append(self._base.version + 1 if self._changes is not None else self._base.version)
        return _frozen_change_set(0, _frozen_list_of([], 1),
                                  _frozen_list_of(add, _pairs_height(add)))

    def updates_slice(self, first_version):
        """The recorded change sets from `first_version` on: [] when up to
        date, None when a full dump is needed. Read-only refs only."""
        _check_ref(self)
        if not self._replica:
            raise SharingError(
                "updates_slice() needs a ref taken with read_only=True: only those "
                "stand for a replica's view of the history")
        if type(first_version) is not int:
            raise InvalidTypeError(
                f"updates_slice(): first_version must be an int, got {_type_name(first_version)}")
        cdef _Snapshot b = self._base
        if first_version == 0:
            return None
        if first_version == b.version:
            return []
        if first_version > b.version or b.hist_lo == b.hist_hi:
            return None
        cdef list hist = b.hist
        if first_version < dict.__getitem__(hist[b.hist_lo], "version"):
            return None
        cdef Py_ssize_t i = b.hist_hi
        while i > b.hist_lo and dict.__getitem__(hist[i - 1], "version") >= first_version:
            i -= 1
        return hist[i:b.hist_hi]


# ---------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class _View:
    cdef object _root
    cdef Py_ssize_t _count
    cdef Py_hash_t _mask

    def __init__(self):
        raise TypeError("views are made by MapRef.keys(), values() and items()")

    def __len__(self):
        return self._count

    def __repr__(self):
        return f"{type(self).__name__.lstrip('_')}({list(self)!r})"


cdef _View _make_view(type cls, MapRef ref):
    cdef _View v = cls.__new__(cls)
    v._mask = ref._map._mask
    v._root = ref._escape_root()
    v._count = ref._count
    return v


@cython.final
cdef class _KeysView(_View):
    def __iter__(self):
        return _iter_trie(self._root, self._count, 0)

    def __contains__(self, key):
        if type(key) is not str:
            if not isinstance(key, str):
                _check_hashable(key)
                return False
            key = PyUnicode_FromObject(key)
        return _find(_root_ptr(self._root), <str>key, PyObject_Hash(key) & self._mask) != NULL


@cython.final
cdef class _ValuesView(_View):
    def __iter__(self):
        return _iter_trie(self._root, self._count, 1)

    def __contains__(self, value):
        for v in _iter_trie(self._root, self._count, 1):
            if v is value or v == value:
                return True
        return False


@cython.final
cdef class _ItemsView(_View):
    def __iter__(self):
        return _iter_trie(self._root, self._count, 2)

    def __contains__(self, item):
        if type(item) is not tuple or len(item) != 2:
            return False
        key, value = item
        if not isinstance(key, str):
            return False
        key = PyUnicode_FromObject(key)
        cdef PyObject* p = _find(_root_ptr(self._root), <str>key,
                                 PyObject_Hash(key) & self._mask)
        if p == NULL:
            return False
        v = <object>p
        return v is value or v == value


