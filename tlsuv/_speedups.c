/* tlsuv._speedups: the per-message steps of tlsuv's data path, compiled.
 *
 * Why this exists
 * ===============
 * A small TLS echo through tlsuv's pure path makes five cffi calls into
 * OpenSSL per message (BIO_write, SSL_read, SSL_write, BIO_read, and the
 * BIO size), and each one converts its arguments and releases and retakes
 * the GIL.  docs/performance.md measured that work, and the Python frames
 * around it, as what keeps any pure-Python server built from pyuv and
 * pyOpenSSL above uvloop's CPU per message.  This module does the same
 * steps in one call each way:
 *
 *   Pipe.receive(data, out)  BIO_write the ciphertext into the incoming BIO,
 *                            then the SSL_read loop, plaintext appended to
 *                            ``out`` (one bytes object per 240 KiB; large
 *                            inputs are decrypted straight into it);
 *   Pipe.write(data)         SSL_write;
 *   Pipe.flush(fd)           drain the outgoing BIO and write(2) it to the
 *                            socket; what the kernel does not take comes
 *                            back as bytes, for libuv to queue.
 *
 * tlsuv.tls keeps the pure-Python code for all of this as the reference and
 * the fallback (TLSUV_NO_EXTENSIONS=1, or no compiler at install time).
 *
 * Which OpenSSL
 * =============
 * The SSL* and BIO* are the very objects pyOpenSSL made, inside the OpenSSL
 * that cryptography bundles.  That OpenSSL's symbols are not exported, so
 * this module cannot link against it: tlsuv._openssl takes the address of
 * each function from pyOpenSSL's cffi binding once, checks its C prototype
 * there, and hands the addresses to bind().  If any is missing, nothing is
 * bound and tlsuv runs the pure path as a whole.
 *
 * The rules this code keeps
 * =========================
 * - It never calls Python code itself.  A handler that closes its
 *   connection runs only after receive() returned: nothing here can go on
 *   with a connection that Python code changed underneath it.  (OpenSSL may
 *   call pyOpenSSL's callbacks -- verification, SNI, ALPN, the key log --
 *   from inside SSL_read during a handshake, the first one or a
 *   renegotiation: tlsuv.tls feeds handshake reads through receive() too.
 *   cffi takes the GIL for those itself, exactly as on the pure path; they
 *   act on the Context and the pyOpenSSL Connection, never on a Pipe, and
 *   pyOpenSSL's wrappers catch whatever they raise.)
 * - Errors are not mapped here.  Whenever SSL_read fails with anything but
 *   SSL_ERROR_WANT_READ, receive() returns SSL_read's result and tlsuv.tls
 *   hands it to the same pyOpenSSL code that maps it on the pure path
 *   (SSL_get_error only peeks at the error queue, so asking again is exact).
 * - A Pipe holds a strong reference to the pyOpenSSL Connection that owns
 *   the SSL* (pyOpenSSL frees it with SSL_free when that object dies), so
 *   the SSL* outlives every call.  The BIO* belong to the SSL* and are only
 *   replaced by tlsuv._openssl.drop_bios/fresh_bios; the engine closes its
 *   Pipe before either (a closed Pipe raises, it never touches OpenSSL).
 * - Every buffer access is bounded by the buffer's size; lengths that do
 *   not fit OpenSSL's int raise OverflowError, as cffi does.
 * - The GIL is held throughout, like a C function that uses the CPython
 *   API: the OpenSSL work per call is bounded (at most one socket read or
 *   one application write) and tlsuv runs one event loop per thread, so
 *   there is nothing for another thread to do meanwhile -- and handing the
 *   GIL over and back around each call is much of what made the cffi calls
 *   expensive.  OpenSSL's callbacks into Python take the GIL with
 *   PyGILState_Ensure, which is re-entrant in this thread.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>

/* Opaque: only pointers to them pass through here. */
typedef struct ssl_st SSL;
typedef struct bio_st BIO;

/* OpenSSL hands back at most one record per SSL_read, and a record carries at
 * most 2**14 bytes of plaintext (RFC 8446 section 5.1).  tlsuv.tls.RECV_SIZE. */
#define RECV_SIZE 16384
/* The scratch buffer: the most plaintext one chunk holds and the most
 * ciphertext one flush drains before asking the BIO for the rest.
 * tlsuv.tls.OUTPUT_MAX; tests/test_speedups.py checks that the two agree. */
#define OUTPUT_MAX (256 * 1024)

/* The functions, as pyOpenSSL's cffi binding declares them. */
static struct {
    int (*SSL_read)(SSL *, void *, int);
    int (*SSL_write)(SSL *, const void *, int);
    int (*SSL_get_error)(const SSL *, int);
    int (*SSL_pending)(const SSL *);
    int (*BIO_read)(BIO *, void *, int);
    int (*BIO_write)(BIO *, const void *, int);
    long (*BIO_get_mem_data)(BIO *, char **);
    int want_read; /* SSL_ERROR_WANT_READ */
    int bound;
} ossl;

/* The names bind() needs, in this order: tlsuv._openssl looks up exactly these. */
static const char *const SYMBOLS[] = {
    "SSL_read", "SSL_write", "SSL_get_error", "SSL_pending",
    "BIO_read", "BIO_write", "BIO_get_mem_data", NULL,
};

/* -- the scratch buffer ------------------------------------------------------
 *
 * One OUTPUT_MAX buffer for the whole module, for SSL_read and the flush: a
 * buffer per call would cost more than decrypting a small record.  The GIL is
 * held whenever it is taken, so no two threads take it at once; the flag
 * covers the ways back in while it is in use -- a pyOpenSSL callback, run by
 * OpenSSL inside SSL_read, that receives on another connection, or another
 * thread that runs while such a callback let go of the GIL -- which then get
 * a buffer of their own.  Pages are touched only as far as they are used.
 */
static char *scratch;
static int scratch_busy;

static char *
scratch_take(void)
{
    if (!scratch_busy) {
        scratch_busy = 1;
        return scratch;
    }
    char *own = PyMem_RawMalloc(OUTPUT_MAX);
    if (own == NULL)
        PyErr_NoMemory();
    return own;
}

static void
scratch_give(char *buf)
{
    if (buf == scratch)
        scratch_busy = 0;
    else
        PyMem_RawFree(buf);
}

/* -- Pipe --------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *owner; /* the pyOpenSSL Connection whose SSL* this is: keeps it alive */
    SSL *ssl;
    BIO *rbio; /* incoming: ciphertext from the network */
    BIO *wbio; /* outgoing: ciphertext for the network */
} PipeObject;

static int
pipe_usable(PipeObject *self)
{
    if (self->ssl == NULL || self->rbio == NULL || self->wbio == NULL) {
        PyErr_SetString(PyExc_ValueError, "tlsuv._speedups.Pipe is closed");
        return 0;
    }
    return 1;
}

static int
address(PyObject *obj, void **out, const char *what)
{
    void *p = PyLong_AsVoidPtr(obj);
    if (p == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s is NULL", what);
        return 0;
    }
    *out = p;
    return 1;
}

static PyObject *
Pipe_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *owner, *ssl, *rbio, *wbio;
    static char *kwlist[] = {"owner", "ssl", "rbio", "wbio", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO:Pipe", kwlist, &owner, &ssl, &rbio, &wbio))
        return NULL;
    if (!ossl.bound) {
        PyErr_SetString(PyExc_RuntimeError, "tlsuv._speedups: bind() was not called");
        return NULL;
    }
    void *s, *r, *w;
    if (!address(ssl, &s, "SSL*") || !address(rbio, &r, "rbio") || !address(wbio, &w, "wbio"))
        return NULL;
    PipeObject *self = (PipeObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(owner);
    self->owner = owner;
    self->ssl = s;
    self->rbio = r;
    self->wbio = w;
    return (PyObject *)self;
}

static int
Pipe_traverse(PipeObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    return 0;
}

static int
Pipe_clear(PipeObject *self)
{
    /* Without its owner the SSL* may be freed: forget the pointers too. */
    self->ssl = NULL;
    self->rbio = NULL;
    self->wbio = NULL;
    Py_CLEAR(self->owner);
    return 0;
}

static void
Pipe_dealloc(PipeObject *self)
{
    PyObject_GC_UnTrack(self);
    Pipe_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Pipe_close(PipeObject *self, PyObject *Py_UNUSED(ignored))
{
    Pipe_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
Pipe_get_closed(PipeObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->ssl == NULL);
}

static int
append_chunk(PyObject *out, const char *buf, Py_ssize_t size)
{
    PyObject *chunk = PyBytes_FromStringAndSize(buf, size);
    if (chunk == NULL)
        return -1;
    int rc = PyList_Append(out, chunk);
    Py_DECREF(chunk);
    return rc;
}

/* Inputs at least this large are decrypted straight into the bytes objects
 * handed over instead of the scratch buffer: for a 16 KiB record the copy out
 * of the scratch buffer costs about a tenth of the whole message, for a small
 * one the exact-size allocation is what is cheap. */
#define DIRECT_MIN 4096

/* The SSL_read loop into bytes objects of their own.  ``hint`` is how much
 * ciphertext waits: a chunk starts with room for that much plaintext plus one
 * record (OpenSSL may hold part of one already), grows when another record
 * waits and would not fit, and is shrunk to what it got.  Chunks close by
 * the scratch path's rule, so both paths hand over the same chunks.  Returns
 * -1 with an exception set, else 0 with *status as Pipe.receive returns it. */
static int
receive_direct(PipeObject *self, PyObject *out, Py_ssize_t hint, long *status)
{
    SSL *ssl = self->ssl;
    BIO *rbio = self->rbio;
    PyObject *chunk = NULL;
    Py_ssize_t cap = 0, used = 0;
    for (;;) {
        if (chunk == NULL) {
            cap = hint < OUTPUT_MAX - RECV_SIZE ? hint + RECV_SIZE : OUTPUT_MAX;
            chunk = PyBytes_FromStringAndSize(NULL, cap);
            if (chunk == NULL)
                return -1;
            used = 0;
        }
        else if (cap - used < RECV_SIZE) {
            /* used <= OUTPUT_MAX - RECV_SIZE (else the chunk was handed over),
             * so OUTPUT_MAX always leaves room for a record. */
            cap = hint < OUTPUT_MAX - RECV_SIZE - used ? used + RECV_SIZE + hint : OUTPUT_MAX;
            if (_PyBytes_Resize(&chunk, cap) < 0)
                return -1; /* chunk is gone */
        }
        /* Here cap - used >= RECV_SIZE: room for a whole record. */
        int n = ossl.SSL_read(ssl, PyBytes_AS_STRING(chunk) + used, RECV_SIZE);
        if (n <= 0) {
            if (ossl.SSL_get_error(ssl, n) != ossl.want_read)
                *status = n;
            break;
        }
        used += n;
        long waiting = ossl.BIO_get_mem_data(rbio, NULL);
        hint = waiting > 0 ? (Py_ssize_t)waiting : 0;
        if (hint == 0 && (n < RECV_SIZE || ossl.SSL_pending(ssl) == 0))
            break;
        if (used > OUTPUT_MAX - RECV_SIZE) { /* no room for another record: hand this chunk over */
            if (used < cap && _PyBytes_Resize(&chunk, used) < 0)
                return -1;
            int rc = PyList_Append(out, chunk);
            Py_CLEAR(chunk);
            if (rc < 0)
                return -1;
        }
    }
    if (chunk == NULL)
        return 0;
    if (used == 0) {
        Py_DECREF(chunk);
        return 0;
    }
    if (used < cap && _PyBytes_Resize(&chunk, used) < 0)
        return -1;
    int rc = PyList_Append(out, chunk);
    Py_DECREF(chunk);
    return rc;
}

PyDoc_STRVAR(Pipe_receive_doc,
"receive(data, out, /) -> int | None\n\
\n\
Feed ciphertext (bytes) into the incoming BIO and run the SSL_read loop,\n\
appending the plaintext to the list ``out``: the records decrypted one after\n\
another, one bytes object per (OUTPUT_MAX - RECV_SIZE) bytes, as\n\
TLSEngine._read_records does.  Returns 1 when the loop ended cleanly (the\n\
BIOs are drained, or OpenSSL wants more input); SSL_read's result (0 or\n\
negative) when it failed with anything else, for tlsuv.tls to map exactly as\n\
the pure path does; None when the BIO took fewer bytes than offered.");

static PyObject *
Pipe_receive(PipeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "receive() takes exactly 2 arguments (data, out)");
        return NULL;
    }
    PyObject *data = args[0], *out = args[1];
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "receive() needs bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "receive() appends to a list");
        return NULL;
    }
    if (!pipe_usable(self))
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "receive(): more than INT_MAX bytes at once");
        return NULL;
    }
    SSL *ssl = self->ssl;
    BIO *rbio = self->rbio;
    if (size > 0 && ossl.BIO_write(rbio, PyBytes_AS_STRING(data), (int)size) != (int)size)
        Py_RETURN_NONE; /* a memory BIO grows: only out of memory */

    long status = 1;
    if (size >= DIRECT_MIN) {
        if (receive_direct(self, out, size, &status) < 0)
            return NULL;
        return PyLong_FromLong(status);
    }
    char *buf = scratch_take();
    if (buf == NULL)
        return NULL;
    Py_ssize_t used = 0; /* plaintext bytes in buf; always <= OUTPUT_MAX - RECV_SIZE before a read */
    int n = ossl.SSL_read(ssl, buf, RECV_SIZE);
    for (;;) {
        if (n > 0) {
            used += n;
            /* Done when no ciphertext waits in the BIO and the record did not
             * fill the request (or nothing decrypted is left inside OpenSSL). */
            if (ossl.BIO_get_mem_data(rbio, NULL) == 0 && (n < RECV_SIZE || ossl.SSL_pending(ssl) == 0))
                break;
            if (used > OUTPUT_MAX - RECV_SIZE) { /* no room for another record */
                if (append_chunk(out, buf, used) < 0) {
                    scratch_give(buf);
                    return NULL;
                }
                used = 0;
            }
        }
        else {
            if (ossl.SSL_get_error(ssl, n) != ossl.want_read)
                status = n; /* close_notify or an error: tlsuv.tls maps it */
            break;
        }
        n = ossl.SSL_read(ssl, buf + used, RECV_SIZE);
    }
    if (used > 0 && append_chunk(out, buf, used) < 0) {
        scratch_give(buf);
        return NULL;
    }
    scratch_give(buf);
    return PyLong_FromLong(status);
}

PyDoc_STRVAR(Pipe_write_doc,
"write(data, /) -> int\n\
\n\
SSL_write the whole of ``data`` (bytes) and return SSL_write's result.");

static PyObject *
Pipe_write(PipeObject *self, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "write() needs bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (!pipe_usable(self))
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "write(): more than INT_MAX bytes at once");
        return NULL;
    }
    return PyLong_FromLong(ossl.SSL_write(self->ssl, PyBytes_AS_STRING(data), (int)size));
}

PyDoc_STRVAR(Pipe_flush_doc,
"flush(fd, most=-1, /) -> int | tuple[int, bytes | int] | None\n\
\n\
Drain the outgoing BIO.  With ``fd`` >= 0 (a non-blocking socket whose\n\
libuv write queue is empty) write(2) it there at once.  Returns the number\n\
of bytes drained when all of them were written (0: there was nothing);\n\
``(drained, rest)`` when the kernel did not take ``rest`` (bytes, for libuv\n\
to queue; everything when ``fd`` < 0); ``(drained, errno)`` when write(2)\n\
failed.  With ``most`` >= 0, returns None and leaves the BIO alone when it\n\
holds more than ``most`` bytes.");

static PyObject *
Pipe_flush(PipeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "flush() takes 1 or 2 arguments (fd, most)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "flush(): not a file descriptor");
        return NULL;
    }
    long most = -1;
    if (nargs == 2) {
        most = PyLong_AsLong(args[1]);
        if (most == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!pipe_usable(self))
        return NULL;
    BIO *wbio = self->wbio;
    if (most >= 0 && ossl.BIO_get_mem_data(wbio, NULL) > most)
        Py_RETURN_NONE;
    char *buf = scratch_take();
    if (buf == NULL)
        return NULL;
    int n = ossl.BIO_read(wbio, buf, OUTPUT_MAX); /* an empty memory BIO answers -1 */
    if (n <= 0) {
        scratch_give(buf);
        return PyLong_FromLong(0);
    }
    const char *p = buf;
    Py_ssize_t size = n;
    PyObject *whole = NULL; /* everything, when it did not fit the scratch buffer */
    if (n >= OUTPUT_MAX) {
        long more = ossl.BIO_get_mem_data(wbio, NULL);
        if (more > INT_MAX - OUTPUT_MAX)
            more = INT_MAX - OUTPUT_MAX; /* the rest stays in the BIO for the next flush */
        if (more > 0) {
            whole = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n + more);
            if (whole == NULL) {
                scratch_give(buf);
                return NULL;
            }
            char *dst = PyBytes_AS_STRING(whole);
            memcpy(dst, buf, (size_t)n);
            int got = ossl.BIO_read(wbio, dst + n, (int)more);
            if (got < 0)
                got = 0;
            if (got < more && _PyBytes_Resize(&whole, (Py_ssize_t)n + got) < 0) {
                scratch_give(buf);
                return NULL;
            }
            p = PyBytes_AS_STRING(whole);
            size = (Py_ssize_t)n + got;
        }
    }
    Py_ssize_t sent = 0;
    if (fd >= 0) {
        do {
            sent = write((int)fd, p, (size_t)size);
        } while (sent < 0 && errno == EINTR);
        if (sent == size) {
            Py_XDECREF(whole);
            scratch_give(buf);
            return PyLong_FromSsize_t(size);
        }
        if (sent < 0) {
            int err = errno;
            if (err != EAGAIN && err != EWOULDBLOCK) {
                Py_XDECREF(whole);
                scratch_give(buf);
                return Py_BuildValue("(ni)", size, err);
            }
            sent = 0;
        }
    }
    PyObject *rest;
    if (whole != NULL && sent == 0) {
        rest = whole;
    }
    else {
        rest = PyBytes_FromStringAndSize(p + sent, size - sent);
        Py_XDECREF(whole);
    }
    scratch_give(buf);
    if (rest == NULL)
        return NULL;
    PyObject *result = Py_BuildValue("(nN)", size, rest);
    return result;
}

static PyMethodDef Pipe_methods[] = {
    {"receive", (PyCFunction)(void (*)(void))Pipe_receive, METH_FASTCALL, Pipe_receive_doc},
    {"write", (PyCFunction)Pipe_write, METH_O, Pipe_write_doc},
    {"flush", (PyCFunction)(void (*)(void))Pipe_flush, METH_FASTCALL, Pipe_flush_doc},
    {"close", (PyCFunction)Pipe_close, METH_NOARGS,
     "Forget the SSL* and BIOs (before they are freed or replaced); every later call raises."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pipe_getset[] = {
    {"closed", (getter)Pipe_get_closed, NULL, "close() was called", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Pipe_doc,
"Pipe(owner, ssl, rbio, wbio)\n\
\n\
One memory-BIO TLS connection's data path: ``owner`` is the pyOpenSSL\n\
Connection, ``ssl``, ``rbio`` and ``wbio`` the addresses of its SSL* and its\n\
two memory BIOs (ints).  Keeps ``owner`` alive.");

static PyTypeObject PipeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tlsuv._speedups.Pipe",
    .tp_basicsize = sizeof(PipeObject),
    .tp_dealloc = (destructor)Pipe_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = Pipe_doc,
    .tp_traverse = (traverseproc)Pipe_traverse,
    .tp_clear = (inquiry)Pipe_clear,
    .tp_methods = Pipe_methods,
    .tp_getset = Pipe_getset,
    .tp_new = Pipe_new,
};

/* -- module ------------------------------------------------------------------- */

PyDoc_STRVAR(bind_doc,
"bind(addresses, want_read, /)\n\
\n\
Take the OpenSSL functions from ``addresses`` (a dict of SYMBOLS to their\n\
addresses, ints), all or none; ``want_read`` is SSL_ERROR_WANT_READ.\n\
Raises, binding nothing, if any address is missing or zero.");

static PyObject *
bind(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "bind(addresses: dict, want_read: int)");
        return NULL;
    }
    long want_read = PyLong_AsLong(args[1]);
    if (want_read == -1 && PyErr_Occurred())
        return NULL;
    void *found[sizeof(SYMBOLS) / sizeof(SYMBOLS[0])];
    for (size_t i = 0; SYMBOLS[i] != NULL; i++) {
        PyObject *addr = PyDict_GetItemString(args[0], SYMBOLS[i]); /* borrowed */
        if (addr == NULL) {
            PyErr_Format(PyExc_LookupError, "no address for %s", SYMBOLS[i]);
            return NULL;
        }
        if (!address(addr, &found[i], SYMBOLS[i]))
            return NULL;
    }
    if (scratch == NULL) {
        /* Uninitialised: OpenSSL overwrites what it returns. */
        scratch = PyMem_RawMalloc(OUTPUT_MAX);
        if (scratch == NULL)
            return PyErr_NoMemory();
    }
    /* Object and function pointers have the same representation on every
     * platform CPython supports (POSIX requires it for dlsym). */
    memcpy(&ossl.SSL_read, &found[0], sizeof(void *));
    memcpy(&ossl.SSL_write, &found[1], sizeof(void *));
    memcpy(&ossl.SSL_get_error, &found[2], sizeof(void *));
    memcpy(&ossl.SSL_pending, &found[3], sizeof(void *));
    memcpy(&ossl.BIO_read, &found[4], sizeof(void *));
    memcpy(&ossl.BIO_write, &found[5], sizeof(void *));
    memcpy(&ossl.BIO_get_mem_data, &found[6], sizeof(void *));
    ossl.want_read = (int)want_read;
    ossl.bound = 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, bind_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tlsuv._speedups",
    .m_doc = "tlsuv's compiled data path (optional; tlsuv.tls has the same steps in Python).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&PipeType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    PyObject *names = PyTuple_New(sizeof(SYMBOLS) / sizeof(SYMBOLS[0]) - 1);
    if (names == NULL)
        goto fail;
    for (Py_ssize_t i = 0; SYMBOLS[i] != NULL; i++) {
        PyObject *s = PyUnicode_FromString(SYMBOLS[i]);
        if (s == NULL) {
            Py_DECREF(names);
            goto fail;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    if (PyModule_AddObject(m, "SYMBOLS", names) < 0) {
        Py_DECREF(names);
        goto fail;
    }
    Py_INCREF(&PipeType);
    if (PyModule_AddObject(m, "Pipe", (PyObject *)&PipeType) < 0) {
        Py_DECREF(&PipeType);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "RECV_SIZE", RECV_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "OUTPUT_MAX", OUTPUT_MAX) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
