/* ledger._speedups: the verifier's compiled hot paths (docs/spec.md §18.5): a reader of
 * canonical ledger text, and the RFC 9162 leaf and node hashes.
 *
 * The reader answers one question fast: is this text exactly the RFC 8785 form of a value in the
 * ledger's subset (docs/spec.md §1.1), shaped as an entry or as a block line? When it is, it
 * hands back each entry's bytes (slices of the text, so they are their own canonical form)
 * and the five entry fields the verifier checks column by column, without building the
 * entries' bodies as Python objects. When it is not, or when the text holds anything it does
 * not decide itself (a backslash in a key, a non-ASCII key, nesting deeper than MAX_DEPTH),
 * it answers None and the pure-Python path of ledger.verify decides, and names the fault.
 * So the module may refuse too much, never accept too much: the tests hold it to the Python
 * path on generated and mutated texts (tests/ledger/test_speedups.py).
 *
 * Canonical here means: no white space; objects with keys in strictly increasing byte order;
 * strings with only the escapes RFC 8785 writes (\" \\ \b \t \n \f \r, and \u00xx in
 * lower-case hex for the other controls below 0x20), otherwise the characters themselves as
 * valid UTF-8 (no surrogates, nothing above U+10FFFF, no overlong forms); integers in
 * shortest decimal within +-(2**53 - 1), no "-0", no fraction or exponent; true, false, null.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_Init & co.: no provider look-up per hash */
#include <Python.h>
#include <openssl/sha.h>
#include <string.h>

#define MAX_DEPTH 128 /* below orjson's own limits: deeper text goes to the Python path */
#define MAX_SAFE 9007199254740991LL /* 2**53 - 1 */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Cursor;

static int scan_value(Cursor *c, int depth);

static int expect(Cursor *c, const char *text, Py_ssize_t length) {
    if (c->end - c->p < length || memcmp(c->p, text, (size_t)length) != 0) return -1;
    c->p += length;
    return 0;
}

static int hex_digit(unsigned char b) {
    if (b >= '0' && b <= '9') return b - '0';
    if (b >= 'a' && b <= 'f') return b - 'a' + 10;
    return -1; /* upper-case hex is not canonical */
}

/* Continuation bytes of a UTF-8 sequence: `count` of them, the first within [low, high]. */
static int continuation(Cursor *c, int count, unsigned char low, unsigned char high) {
    if (c->end - c->p < count) return -1;
    if (c->p[0] < low || c->p[0] > high) return -1;
    for (int i = 1; i < count; i++) {
        if (c->p[i] < 0x80 || c->p[i] > 0xBF) return -1;
    }
    c->p += count;
    return 0;
}

/* A string at c->p (its opening quote). `plain`: refuse a backslash or a non-ASCII byte (keys,
 * and the entry fields handed back as str). */
static int scan_string(Cursor *c, int plain) {
    if (c->p >= c->end || *c->p != '"') return -1;
    c->p++;
    while (c->p < c->end) {
        unsigned char b = *c->p++;
        if (b == '"') return 0;
        if (b < 0x20) return -1;
        if (b < 0x80) {
            if (b != '\\') continue;
            if (plain || c->p >= c->end) return -1;
            b = *c->p++;
            if (b == '"' || b == '\\' || b == 'b' || b == 't' || b == 'n' || b == 'f' ||
                b == 'r')
                continue;
            if (b != 'u' || c->end - c->p < 4) return -1;
            if (c->p[0] != '0' || c->p[1] != '0') return -1;
            int high = hex_digit(c->p[2]), low = hex_digit(c->p[3]);
            if (high < 0 || high > 1 || low < 0) return -1;
            int code = high * 16 + low;
            if (code == 0x08 || code == 0x09 || code == 0x0A || code == 0x0C || code == 0x0D)
                return -1; /* these have short escapes */
            c->p += 4;
            continue;
        }
        if (plain) return -1;
        int ok;
        if (b >= 0xC2 && b <= 0xDF) ok = continuation(c, 1, 0x80, 0xBF);
        else if (b == 0xE0) ok = continuation(c, 2, 0xA0, 0xBF);
        else if (b >= 0xE1 && b <= 0xEC) ok = continuation(c, 2, 0x80, 0xBF);
        else if (b == 0xED) ok = continuation(c, 2, 0x80, 0x9F); /* no surrogates */
        else if (b >= 0xEE && b <= 0xEF) ok = continuation(c, 2, 0x80, 0xBF);
        else if (b == 0xF0) ok = continuation(c, 3, 0x90, 0xBF);
        else if (b >= 0xF1 && b <= 0xF3) ok = continuation(c, 3, 0x80, 0xBF);
        else if (b == 0xF4) ok = continuation(c, 3, 0x80, 0x8F);
        else ok = -1;
        if (ok < 0) return -1;
    }
    return -1;
}

/* An integer at c->p; its value in *value. */
static int scan_integer(Cursor *c, long long *value) {
    int negative = 0;
    if (c->p < c->end && *c->p == '-') {
        negative = 1;
        c->p++;
    }
    if (c->p >= c->end || *c->p < '0' || *c->p > '9') return -1;
    long long n = 0;
    if (*c->p == '0') {
        c->p++;
        if (negative) return -1; /* "-0" is written "0" */
    } else {
        int digits = 0;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            if (++digits > 16) return -1;
            n = n * 10 + (*c->p++ - '0');
        }
        if (n > MAX_SAFE) return -1;
    }
    if (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E' ||
                          (*c->p >= '0' && *c->p <= '9')))
        return -1; /* a float, or a leading zero */
    *value = negative ? -n : n;
    return 0;
}

/* An object's members after its '{', up to and including its '}'. */
static int scan_members(Cursor *c, int depth) {
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 0;
    }
    const unsigned char *previous = NULL;
    Py_ssize_t previous_length = 0;
    for (;;) {
        const unsigned char *key = c->p + 1;
        if (scan_string(c, 1) < 0) return -1;
        Py_ssize_t length = c->p - 1 - key;
        if (previous != NULL) {
            Py_ssize_t shorter = length < previous_length ? length : previous_length;
            int order = memcmp(previous, key, (size_t)shorter);
            if (order > 0 || (order == 0 && previous_length >= length)) return -1;
        }
        previous = key;
        previous_length = length;
        if (expect(c, ":", 1) < 0 || scan_value(c, depth) < 0) return -1;
        if (c->p >= c->end) return -1;
        unsigned char b = *c->p++;
        if (b == '}') return 0;
        if (b != ',') return -1;
    }
}

static int scan_value(Cursor *c, int depth) {
    if (c->p >= c->end || depth > MAX_DEPTH) return -1;
    long long ignored;
    switch (*c->p) {
        case '{':
            c->p++;
            return scan_members(c, depth + 1);
        case '[':
            c->p++;
            if (c->p < c->end && *c->p == ']') {
                c->p++;
                return 0;
            }
            for (;;) {
                if (scan_value(c, depth + 1) < 0 || c->p >= c->end) return -1;
                unsigned char b = *c->p++;
                if (b == ']') return 0;
                if (b != ',') return -1;
            }
        case '"':
            return scan_string(c, 0);
        case 't':
            return expect(c, "true", 4);
        case 'f':
            return expect(c, "false", 5);
        case 'n':
            return expect(c, "null", 4);
        default:
            return scan_integer(c, &ignored);
    }
}

/* The columns handed back: one list per entry field. */
typedef struct {
    PyObject *seqs, *chains, *versions, *types, *times;
} Columns;

static void columns_clear(Columns *columns) {
    Py_CLEAR(columns->seqs);
    Py_CLEAR(columns->chains);
    Py_CLEAR(columns->versions);
    Py_CLEAR(columns->types);
    Py_CLEAR(columns->times);
}

static int columns_init(Columns *columns) {
    columns->seqs = PyList_New(0);
    columns->chains = PyList_New(0);
    columns->versions = PyList_New(0);
    columns->types = PyList_New(0);
    columns->times = PyList_New(0);
    if (!columns->seqs || !columns->chains || !columns->versions || !columns->types ||
        !columns->times) {
        columns_clear(columns);
        return -1;
    }
    return 0;
}

/* Append a new reference to `list`, consuming it. */
static int append_new(PyObject *list, PyObject *item) {
    if (item == NULL) return -1;
    int result = PyList_Append(list, item);
    Py_DECREF(item);
    return result;
}

/* A plain string field's text (scan_string(c, 1) just passed it), as str. */
static PyObject *plain_text(const unsigned char *start, const unsigned char *end) {
    return PyUnicode_FromStringAndSize((const char *)start + 1, end - start - 2);
}

/* Outcome of scanning an entry: canonical (0), not decided here (-1), Python error (-2). */
static int scan_entry(Cursor *c, Columns *columns) {
    long long seq, version;
    const unsigned char *chain, *chain_end, *time, *time_end, *type, *type_end;
    if (expect(c, "{\"body\":{", 9) < 0) return -1;
    if (scan_members(c, 2) < 0) return -1;
    if (expect(c, ",\"chain\":", 9) < 0) return -1;
    chain = c->p;
    if (scan_string(c, 1) < 0) return -1;
    chain_end = c->p;
    if (expect(c, ",\"seq\":", 7) < 0 || scan_integer(c, &seq) < 0) return -1;
    if (expect(c, ",\"time\":", 8) < 0) return -1;
    time = c->p;
    if (scan_string(c, 1) < 0) return -1;
    time_end = c->p;
    if (expect(c, ",\"type\":", 8) < 0) return -1;
    type = c->p;
    if (scan_string(c, 1) < 0) return -1;
    type_end = c->p;
    if (expect(c, ",\"v\":", 5) < 0 || scan_integer(c, &version) < 0) return -1;
    if (expect(c, "}", 1) < 0) return -1;
    if (append_new(columns->seqs, PyLong_FromLongLong(seq)) < 0 ||
        append_new(columns->chains, plain_text(chain, chain_end)) < 0 ||
        append_new(columns->versions, PyLong_FromLongLong(version)) < 0 ||
        append_new(columns->types, plain_text(type, type_end)) < 0 ||
        append_new(columns->times, plain_text(time, time_end)) < 0)
        return -2;
    return 0;
}

static PyObject *columns_tuple(Columns *columns) {
    PyObject *result = PyTuple_Pack(5, columns->seqs, columns->chains, columns->versions,
                                    columns->types, columns->times);
    columns_clear(columns);
    return result;
}

PyDoc_STRVAR(entry_columns_doc,
             "entry_columns(datas, /)\n--\n\n"
             "For a list of entry texts, each exactly the canonical form of an entry "
             "({body: object, chain, seq, time, type, v}), the lists (seqs, chains, versions, "
             "types, times); None when any text is not, or is not decided here.");

static PyObject *entry_columns(PyObject *module, PyObject *datas) {
    (void)module;
    if (!PyList_Check(datas)) {
        PyErr_SetString(PyExc_TypeError, "entry_columns takes a list of bytes");
        return NULL;
    }
    Columns columns;
    if (columns_init(&columns) < 0) return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(datas); i++) {
        PyObject *data = PyList_GET_ITEM(datas, i);
        if (!PyBytes_Check(data)) {
            columns_clear(&columns);
            PyErr_SetString(PyExc_TypeError, "entry_columns takes a list of bytes");
            return NULL;
        }
        Cursor c = {(const unsigned char *)PyBytes_AS_STRING(data), NULL};
        c.end = c.p + PyBytes_GET_SIZE(data);
        int outcome = scan_entry(&c, &columns);
        if (outcome == -2) {
            columns_clear(&columns);
            return NULL;
        }
        if (outcome < 0 || c.p != c.end) {
            columns_clear(&columns);
            Py_RETURN_NONE;
        }
    }
    return columns_tuple(&columns);
}

PyDoc_STRVAR(split_block_doc,
             "split_block(line, /)\n--\n\n"
             "For a block line that is exactly the canonical form of {entries: [entry...], "
             "header: object, signature: string}: (datas, (seqs, chains, versions, types, "
             "times), header, signature), where datas are the entries' texts and header and "
             "signature the texts of those two values; None when the line is not, or is not "
             "decided here.");

static PyObject *split_block(PyObject *module, PyObject *line) {
    (void)module;
    if (!PyBytes_Check(line)) {
        PyErr_SetString(PyExc_TypeError, "split_block takes bytes");
        return NULL;
    }
    Cursor c = {(const unsigned char *)PyBytes_AS_STRING(line), NULL};
    c.end = c.p + PyBytes_GET_SIZE(line);
    if (expect(&c, "{\"entries\":[", 12) < 0) Py_RETURN_NONE;
    Columns columns;
    if (columns_init(&columns) < 0) return NULL;
    PyObject *datas = PyList_New(0);
    if (datas == NULL) {
        columns_clear(&columns);
        return NULL;
    }
    int outcome = 0;
    if (c.p < c.end && *c.p == ']') {
        c.p++;
    } else {
        for (;;) {
            const unsigned char *start = c.p;
            outcome = scan_entry(&c, &columns);
            if (outcome < 0) break;
            PyObject *data =
                PyBytes_FromStringAndSize((const char *)start, (Py_ssize_t)(c.p - start));
            if (append_new(datas, data) < 0) {
                outcome = -2;
                break;
            }
            if (c.p >= c.end) {
                outcome = -1;
                break;
            }
            unsigned char b = *c.p++;
            if (b == ']') break;
            if (b != ',') {
                outcome = -1;
                break;
            }
        }
    }
    const unsigned char *header = NULL, *header_end = NULL, *signature = NULL;
    if (outcome == 0) {
        if (expect(&c, ",\"header\":{", 11) < 0) {
            outcome = -1;
        } else {
            header = c.p - 1;
            if (scan_members(&c, 1) < 0) outcome = -1;
            header_end = c.p;
        }
    }
    if (outcome == 0) {
        if (expect(&c, ",\"signature\":", 13) < 0) {
            outcome = -1;
        } else {
            signature = c.p;
            if (scan_string(&c, 0) < 0 || c.end - c.p != 1 || *c.p != '}') outcome = -1;
        }
    }
    if (outcome < 0) {
        Py_DECREF(datas);
        columns_clear(&columns);
        if (outcome == -2) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *packed = columns_tuple(&columns);
    if (packed == NULL) {
        Py_DECREF(datas);
        return NULL;
    }
    return Py_BuildValue("(NNy#y#)", datas, packed, (const char *)header,
                         (Py_ssize_t)(header_end - header), (const char *)signature,
                         (Py_ssize_t)(c.p - signature));
}

/* The hashes, for a Merkle tree, are those of ledger/merkle.py: SHA-256 of a prefix byte and
 * the data. No check of the data is made here: that is the reader's and the verifier's. */

static PyObject *prefixed_hashes(PyObject *items, unsigned char prefix, Py_ssize_t step) {
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "a list of bytes is needed");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(items);
    if (count % step != 0) {
        PyErr_SetString(PyExc_ValueError, "node hashes are made of pairs");
        return NULL;
    }
    PyObject *result = PyList_New(count / step);
    if (result == NULL) return NULL;
    for (Py_ssize_t i = 0; i < count; i += step) {
        SHA256_CTX context;
        unsigned char digest[SHA256_DIGEST_LENGTH];
        SHA256_Init(&context);
        SHA256_Update(&context, &prefix, 1);
        for (Py_ssize_t j = i; j < i + step; j++) {
            PyObject *item = PyList_GET_ITEM(items, j);
            if (!PyBytes_Check(item)) {
                Py_DECREF(result);
                PyErr_SetString(PyExc_TypeError, "a list of bytes is needed");
                return NULL;
            }
            SHA256_Update(&context, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
        }
        SHA256_Final(digest, &context);
        PyObject *hash = PyBytes_FromStringAndSize((const char *)digest, SHA256_DIGEST_LENGTH);
        if (hash == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, i / step, hash);
    }
    return result;
}

PyDoc_STRVAR(leaf_hashes_doc,
             "leaf_hashes(datas, /)\n--\n\n"
             "SHA-256(0x00 || data) of each of a list of bytes.");

static PyObject *leaf_hashes(PyObject *module, PyObject *datas) {
    (void)module;
    return prefixed_hashes(datas, 0x00, 1);
}

PyDoc_STRVAR(node_hashes_doc,
             "node_hashes(nodes, /)\n--\n\n"
             "SHA-256(0x01 || left || right) of each pair of a list of bytes of even length: "
             "nodes[0] with nodes[1], nodes[2] with nodes[3], ...");

static PyObject *node_hashes(PyObject *module, PyObject *nodes) {
    (void)module;
    return prefixed_hashes(nodes, 0x01, 2);
}

static PyMethodDef methods[] = {
    {"leaf_hashes", leaf_hashes, METH_O, leaf_hashes_doc},
    {"node_hashes", node_hashes, METH_O, node_hashes_doc},
    {"entry_columns", entry_columns, METH_O, entry_columns_doc},
    {"split_block", split_block, METH_O, split_block_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ledger._speedups",
    "The verifier's compiled hot paths (see ledger/_speedups.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
