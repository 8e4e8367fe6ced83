/* livemig._faultpath: post-copy's fault path without the GIL.
 *
 * A fault in post-copy is answered by three threads in turn (the destination's fault reader,
 * the source's request server, the destination's page installer). In Python each of them
 * waits for the GIL behind threads busy placing or pushing pages, so a fault costs a
 * millisecond where the wire needs a tenth of that. Here both ends are C loops, run from a
 * Python thread with the GIL released:
 *
 *   serve_requests  (source) reads PAGE_REQUEST records on the urgent connection and answers
 *                   each with a PAGES record of raw pages straight from frozen guest RAM;
 *   fault_loop      (destination) reads userfaultfd, installs pages a fault needs from the
 *                   urgent connection and pushed pages from the main connection, asks for
 *                   owed pages on the urgent connection, zero-fills pages nobody owes.
 *
 * The records are those of wire.py and pages.py (header with CRC-32s; PAGES with the zero
 * and raw codecs only, which is all post-copy allows). The state shared with Python is a set
 * of numpy arrays it owns; each loop is the only writer while it runs, and Python reads them
 * after the loop returned (or reads counters it may see a little late). Any error returns a
 * code: Python then carries on with its own (slower) path, which also handles recovery.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define PAGE 4096
#define HDR 16
#define T_PAGES 5
#define T_PAGE_REQUEST 18
#define MAX_BATCH 512
#define MAX_REQUEST 4096
#define CODEC_ZERO 0
#define CODEC_RAW 1
#define RUN_MAX 64 /* pages installed between two looks at faults and answers */
#define RECV_CHUNK (256 << 10)

/* results of a loop (negative: -errno of a system call) */
enum { R_STOPPED = 0, R_CLOSED = 1, R_PROTOCOL = 2 };

/* counters (int64 array shared with Python), source side */
enum { S_REQUESTS, S_PULLED, S_BYTES, S_AHEAD, S_QUEUE_MAX, S_CURSOR, S_QUEUED, S_NCOUNT };
/* counters, destination side */
enum {
    D_FAULTS, D_PULLED, D_PUSHED, D_ZERO, D_NLAT, D_BLOCKED_NS, D_LAST_NS, D_BYTES,
    D_REMAINING, D_REQUESTS, D_FAILED_FD, D_NCOUNT
};
/* which connection a destination loop failed on (D_FAILED_FD) */
enum { FD_NONE = 0, FD_MAIN = 1, FD_URGENT = 2, FD_UFFD = 3 };

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint32_t crc(uint32_t c, const void *p, size_t n) {
    return (uint32_t)crc32(c, (const Bytef *)p, (uInt)n);
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void make_header(uint8_t *h, int type, uint32_t len, uint32_t payload_crc) {
    h[0] = 'L'; h[1] = 'M'; h[2] = (uint8_t)type; h[3] = 0;
    put32(h + 4, len);
    put32(h + 8, payload_crc);
    put32(h + 12, crc(0, h, 12));
}

/* 0, or R_PROTOCOL with the header's fault */
static int check_header(const uint8_t *h, int type, uint32_t max_len, uint32_t *len) {
    if (h[0] != 'L' || h[1] != 'M' || h[3] != 0) return R_PROTOCOL;
    if (get32(h + 12) != crc(0, h, 12)) return R_PROTOCOL;
    if (h[2] != type) return R_PROTOCOL;
    *len = get32(h + 4);
    return *len > max_len ? R_PROTOCOL : 0;
}

/* write every byte of iov (advancing it) unless stop_fd becomes readable first (a peer that
 * stopped reading must not hold a loop that is asked to end): 0, STOP_SEEN or -errno */
#define STOP_SEEN 100
static int write_all(int fd, int stop_fd, struct iovec *iov, int cnt) {
    while (cnt > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)(cnt > 1024 ? 1024 : cnt)};
        ssize_t n = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) return -errno;
            struct pollfd p[2] = {{fd, POLLOUT, 0}, {stop_fd, POLLIN, 0}};
            if (poll(p, 2, -1) < 0 && errno != EINTR) return -errno;
            if (p[1].revents) return STOP_SEEN;
            continue;
        }
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static size_t meta_size(size_t n) { return (8 + n * 13 + 7) & ~(size_t)7; }

/* ---- source: the request server ---------------------------------------------------------- */

/* read exactly n bytes unless stop_fd becomes readable: 0, STOP_SEEN, R_CLOSED, -errno */
static int read_exact(int fd, int stop_fd, uint8_t *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        struct pollfd p[2] = {{fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (p[1].revents) return STOP_SEEN;
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r == 0) return R_CLOSED;
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -errno;
        }
        got += (size_t)r;
    }
    return 0;
}

typedef struct {
    int sock, stop_fd;
    const uint8_t *ram;
    int64_t npages;
    const uint8_t *owed;
    uint8_t *sent;
    int64_t *count;
    uint8_t meta[8 + MAX_BATCH * 13 + 8];
    struct iovec iov[MAX_BATCH + 2];
    uint64_t req[MAX_REQUEST];
} Server;

/* answer pages idx[0..n) (n <= MAX_BATCH) with one PAGES record of raw pages */
static int answer(Server *s, const uint64_t *idx, size_t n) {
    size_t m = meta_size(n);
    uint8_t *meta = s->meta;
    memset(meta, 0, m);
    put32(meta, (uint32_t)n);
    memcpy(meta + 8, idx, n * 8);
    for (size_t i = 0; i < n; i++) {
        put32(meta + 8 + n * 8 + i * 4, PAGE);
        meta[8 + n * 12 + i] = CODEC_RAW;
    }
    uint8_t h[HDR];
    uint32_t c = crc(0, meta, m);
    for (size_t i = 0; i < n; i++) c = crc(c, s->ram + idx[i] * PAGE, PAGE);
    size_t len = m + n * PAGE;
    make_header(h, T_PAGES, (uint32_t)len, c);
    s->iov[0] = (struct iovec){h, HDR};
    s->iov[1] = (struct iovec){meta, m};
    for (size_t i = 0; i < n; i++)
        s->iov[2 + i] = (struct iovec){(void *)(s->ram + idx[i] * PAGE), PAGE};
    /* Marked before the write, as Python's path does: the peer may act on the pages (and a
     * reader of `sent` look) as soon as they are out; a failed write ends the connection,
     * and a recovery clears `sent` anyway. */
    int64_t ahead = 0;
    for (size_t i = 0; i < n; i++) {
        if (s->owed[idx[i]] && !s->sent[idx[i]]) ahead++;
        s->sent[idx[i]] = 1;
    }
    int rc = write_all(s->sock, s->stop_fd, s->iov, (int)n + 2);
    if (rc) return rc;
    int64_t queued = __atomic_load_n(&s->count[S_QUEUED], __ATOMIC_RELAXED);
    if (queued > __atomic_load_n(&s->count[S_QUEUE_MAX], __ATOMIC_RELAXED))
        __atomic_store_n(&s->count[S_QUEUE_MAX], queued, __ATOMIC_RELAXED);
    __atomic_fetch_sub(&s->count[S_QUEUED], ahead, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->count[S_AHEAD], ahead, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->count[S_PULLED], (int64_t)n, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->count[S_BYTES], (int64_t)(len + HDR), __ATOMIC_RELAXED);
    __atomic_store_n(&s->count[S_CURSOR], (int64_t)idx[n - 1] + 1, __ATOMIC_RELAXED);
    return 0;
}

static int serve(Server *s) {
    uint64_t *req = s->req;
    for (;;) {
        uint8_t h[HDR];
        uint32_t len;
        int rc = read_exact(s->sock, s->stop_fd, h, HDR);
        if (rc == STOP_SEEN) return R_STOPPED;
        if (rc) return rc;
        if (check_header(h, T_PAGE_REQUEST, MAX_REQUEST * 8, &len) || len == 0 || len % 8)
            return R_PROTOCOL;
        rc = read_exact(s->sock, s->stop_fd, (uint8_t *)req, len);
        if (rc == STOP_SEEN) return R_STOPPED;
        if (rc) return rc;
        if (crc(0, req, len) != get32(h + 8)) return R_PROTOCOL;
        size_t n = len / 8;
        for (size_t i = 0; i < n; i++)
            if (req[i] >= (uint64_t)s->npages) return R_PROTOCOL;
        for (size_t i = 0; i < n; i += MAX_BATCH) {
            rc = answer(s, req + i, n - i < MAX_BATCH ? n - i : MAX_BATCH);
            if (rc) return rc == STOP_SEEN ? R_STOPPED : rc;
        }
        __atomic_fetch_add(&s->count[S_REQUESTS], 1, __ATOMIC_RELAXED);
    }
}

static int writable_buffer(PyObject *o, Py_buffer *b, Py_ssize_t min_len, const char *what) {
    if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len < min_len) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, min_len);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *py_serve_requests(PyObject *self, PyObject *args) {
    int sock, stop_fd;
    unsigned long long ram;
    long long npages;
    PyObject *owed_o, *sent_o, *count_o;
    if (!PyArg_ParseTuple(args, "iiKLOOO", &sock, &stop_fd, &ram, &npages, &owed_o, &sent_o,
                          &count_o))
        return NULL;
    Server *s = calloc(1, sizeof(Server));
    if (!s) return PyErr_NoMemory();
    Py_buffer owed, sent, count;
    if (writable_buffer(owed_o, &owed, npages, "owed") < 0) { free(s); return NULL; }
    if (writable_buffer(sent_o, &sent, npages, "sent") < 0) {
        PyBuffer_Release(&owed); free(s); return NULL;
    }
    if (writable_buffer(count_o, &count, S_NCOUNT * 8, "counters") < 0) {
        PyBuffer_Release(&owed); PyBuffer_Release(&sent); free(s); return NULL;
    }
    s->sock = sock;
    s->stop_fd = stop_fd;
    s->ram = (const uint8_t *)(uintptr_t)ram;
    s->npages = npages;
    s->owed = owed.buf;
    s->sent = sent.buf;
    s->count = count.buf;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = serve(s);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&owed);
    PyBuffer_Release(&sent);
    PyBuffer_Release(&count);
    free(s);
    return PyLong_FromLong(rc);
}

/* ---- destination: the fault loop --------------------------------------------------------- */

typedef struct {
    int fd, which;
    int closed; /* EOF seen once nothing was owed any more */
    uint8_t hdr[HDR];
    size_t got, len;
    int in_payload;
    uint32_t want_crc, crc;
    uint8_t *buf;
} Conn;

typedef struct {
    int uffd, stop_fd, done_fd;
    uint8_t *base, *alias;
    int64_t npages;
    const uint8_t *owed, *minor;
    uint8_t *received;
    int64_t *t_first, *t_sum;
    int32_t *nfault;
    double *lat;
    int64_t lat_cap;
    int64_t *count;
    Conn main, urgent;
    uint64_t req[MAX_REQUEST];
    size_t nreq;
    const uint8_t *data[MAX_BATCH];
} Dest;

static void add(Dest *d, int i, int64_t v) { __atomic_fetch_add(&d->count[i], v, __ATOMIC_RELAXED); }

/* rc, noting which connection failed (the first failure wins) */
static int fail(Dest *d, int which, int rc) {
    if (rc && rc != STOP_SEEN) {
        int64_t none = FD_NONE;
        __atomic_compare_exchange_n(&d->count[D_FAILED_FD], &none, which, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
    }
    return rc;
}

static int uffd_call(Dest *d, unsigned long op, void *arg) {
    for (;;) {
        if (ioctl(d->uffd, op, arg) == 0) return 0;
        if (errno == EAGAIN || errno == EINTR) continue;
        return errno == EEXIST ? 0 : -errno; /* EEXIST: mapped already, nobody waits on it */
    }
}

static int map_page(Dest *d, int64_t p, const uint8_t *src) {
    uint64_t addr = (uint64_t)(uintptr_t)(d->base + p * PAGE);
    if (d->minor[p]) { /* stale contents in the memfd: rewrite through the alias, then map */
        if (src) memcpy(d->alias + p * PAGE, src, PAGE);
        else memset(d->alias + p * PAGE, 0, PAGE);
        struct uffdio_continue c = {{addr, PAGE}, 0, 0};
        return uffd_call(d, UFFDIO_CONTINUE, &c);
    }
    if (src) {
        struct uffdio_copy c = {addr, (uint64_t)(uintptr_t)src, PAGE, 0, 0};
        return uffd_call(d, UFFDIO_COPY, &c);
    }
    struct uffdio_zeropage z = {{addr, PAGE}, 0, 0};
    return uffd_call(d, UFFDIO_ZEROPAGE, &z);
}

/* bookkeeping once page p is in: who waited on it, what is still owed */
static void landed(Dest *d, int64_t p, int pulled) {
    d->received[p] = 1;
    if (!d->owed[p]) return;
    int64_t t = now_ns();
    if (d->nfault[p]) {
        int64_t n = __atomic_fetch_add(&d->count[D_NLAT], 1, __ATOMIC_RELAXED);
        if (n < d->lat_cap) d->lat[n] = (double)(t - d->t_first[p]) / 1e6;
        add(d, D_BLOCKED_NS, d->nfault[p] * t - d->t_sum[p]);
        d->nfault[p] = 0;
    }
    add(d, pulled ? D_PULLED : D_PUSHED, 1);
    if (__atomic_sub_fetch(&d->count[D_REMAINING], 1, __ATOMIC_RELAXED) == 0) {
        __atomic_store_n(&d->count[D_LAST_NS], t, __ATOMIC_RELAXED);
        uint64_t one = 1;
        if (write(d->done_fd, &one, 8) < 0) { /* eventfd: cannot fail while it is open */ }
    }
}

/* install idx[i] (raw data at data[i], or zero when data[i] is NULL), n pages, skipping any
 * here already; runs of absent pages go in one UFFDIO_COPY. Between runs of a push, faults
 * and answers to them are served first (`interleave`). */
static int interleave(Dest *d);

static int install(Dest *d, const uint64_t *idx, const uint8_t *const *data, size_t n,
                   int pulled) {
    size_t i = 0;
    while (i < n) {
        int64_t p = (int64_t)idx[i];
        if (d->received[p]) { i++; continue; }
        size_t run = 1;
        if (data[i] && !d->minor[p]) {
            while (i + run < n && run < RUN_MAX && idx[i + run] == idx[i] + run &&
                   data[i + run] == data[i] + run * PAGE && !d->received[p + run] &&
                   !d->minor[p + run])
                run++;
        }
        int rc = 0;
        struct uffdio_copy c = {(uint64_t)(uintptr_t)(d->base + p * PAGE),
                                (uint64_t)(uintptr_t)data[i], run * PAGE, 0, 0};
        if (run > 1 && ioctl(d->uffd, UFFDIO_COPY, &c) == 0) {
            for (size_t k = 0; k < run; k++) landed(d, p + (int64_t)k, pulled);
        } else { /* one page (a page of the run may be there already: page by page) */
            run = 1;
            if ((rc = map_page(d, p, data[i]))) return rc;
            landed(d, p, pulled);
        }
        i += run;
        if (!pulled && (rc = interleave(d))) return rc;
    }
    return 0;
}

/* a complete PAGES payload in c->buf: check it as pages.py does, then install it */
static int apply_pages(Dest *d, Conn *c) {
    const uint8_t **data = d->data;
    const uint8_t *b = c->buf;
    size_t len = c->len;
    if (len < 8) return R_PROTOCOL;
    uint32_t n = get32(b);
    if (get32(b + 4) != 0 || n == 0 || n > MAX_BATCH) return R_PROTOCOL;
    size_t m = meta_size(n);
    if (len < m) return R_PROTOCOL;
    const uint64_t *idx = (const uint64_t *)(b + 8);
    const uint8_t *lens = b + 8 + n * 8, *ids = b + 8 + n * 12;
    size_t raw = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t l = get32(lens + 4 * i);
        if (idx[i] >= (uint64_t)d->npages) return R_PROTOCOL;
        if (ids[i] == CODEC_ZERO ? l != 0 : ids[i] != CODEC_RAW || l != PAGE) return R_PROTOCOL;
        raw += ids[i] == CODEC_RAW;
    }
    if (m + raw * PAGE != len) return R_PROTOCOL;
    const uint8_t *next = b + m; /* zero pages carry no data; raw data in table order */
    for (uint32_t i = 0; i < n; i++) {
        data[i] = ids[i] == CODEC_RAW ? next : NULL;
        if (data[i]) next += PAGE;
    }
    add(d, D_BYTES, (int64_t)(len + HDR));
    return install(d, idx, data, n, c == &d->urgent);
}

/* read what is there on c (at most `budget` bytes), applying each complete record */
static int pump_conn(Dest *d, Conn *c, size_t budget);

static int pump(Dest *d, Conn *c, size_t budget) {
    return fail(d, c->which, pump_conn(d, c, budget));
}

static int pump_conn(Dest *d, Conn *c, size_t budget) {
    while (budget > 0) {
        uint8_t *dst;
        size_t want;
        if (!c->in_payload) { dst = c->hdr + c->got; want = HDR - c->got; }
        else { dst = c->buf + c->got; want = c->len - c->got; }
        if (want > budget) want = budget;
        ssize_t r = want ? recv(c->fd, dst, want, MSG_DONTWAIT) : 0;
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            return -errno;
        }
        if (r == 0 && want) {
            if (__atomic_load_n(&d->count[D_REMAINING], __ATOMIC_RELAXED) == 0) {
                c->closed = 1; /* all here: the source may go */
                return 0;
            }
            return R_CLOSED;
        }
        budget -= (size_t)r;
        if (c->in_payload) c->crc = crc(c->crc, dst, (size_t)r);
        c->got += (size_t)r;
        if (!c->in_payload && c->got == HDR) {
            uint32_t len;
            if (check_header(c->hdr, T_PAGES, (uint32_t)(meta_size(MAX_BATCH) + MAX_BATCH * PAGE),
                             &len))
                return R_PROTOCOL;
            c->len = len; c->got = 0; c->in_payload = 1;
            c->want_crc = get32(c->hdr + 8); c->crc = 0;
        }
        if (c->in_payload && c->got == c->len) {
            if (c->crc != c->want_crc) return R_PROTOCOL;
            c->in_payload = 0; c->got = 0;
            int rc = apply_pages(d, c);
            if (rc) return rc;
        }
    }
    return 0;
}

static int send_requests(Dest *d) {
    if (d->nreq == 0) return 0;
    uint8_t h[HDR];
    size_t len = d->nreq * 8;
    make_header(h, T_PAGE_REQUEST, (uint32_t)len, crc(0, d->req, len));
    struct iovec iov[2] = {{h, HDR}, {d->req, len}};
    d->nreq = 0;
    add(d, D_REQUESTS, 1);
    return fail(d, FD_URGENT, write_all(d->urgent.fd, d->stop_fd, iov, 2));
}

static int on_fault(Dest *d, uint64_t addr, int minor) {
    int64_t p = (int64_t)((addr - (uint64_t)(uintptr_t)d->base) / PAGE);
    if (addr < (uint64_t)(uintptr_t)d->base || p >= d->npages) return 0;
    add(d, D_FAULTS, 1);
    uint64_t page = (uint64_t)(uintptr_t)(d->base + p * PAGE);
    if (d->received[p]) { /* installed after the fault was queued */
        struct uffdio_range r = {page, PAGE};
        return uffd_call(d, UFFDIO_WAKE, &r);
    }
    if (!d->owed[p]) { /* here already (MINOR), or the source held nothing there */
        int rc;
        if (minor) {
            struct uffdio_continue c = {{page, PAGE}, 0, 0};
            rc = uffd_call(d, UFFDIO_CONTINUE, &c);
        } else {
            rc = map_page(d, p, NULL);
            add(d, D_ZERO, 1);
        }
        d->received[p] = 1;
        return rc;
    }
    int64_t t = now_ns();
    if (d->nfault[p]++ == 0) {
        d->t_first[p] = t;
        d->req[d->nreq++] = (uint64_t)p;
    }
    d->t_sum[p] += t;
    return d->nreq == MAX_REQUEST ? send_requests(d) : 0;
}

static int read_faults(Dest *d) {
    struct uffd_msg msg[32];
    for (;;) {
        ssize_t r = read(d->uffd, msg, sizeof msg);
        if (r < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            return fail(d, FD_UFFD, -errno);
        }
        for (size_t i = 0; i < (size_t)r / sizeof msg[0]; i++) {
            if (msg[i].event != UFFD_EVENT_PAGEFAULT) continue;
            int rc = on_fault(d, msg[i].arg.pagefault.address,
                              (msg[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0);
            if (rc) return fail(d, FD_UFFD, rc);
        }
        if ((size_t)r < sizeof msg) break;
    }
    return send_requests(d);
}

/* faults first, then answers to them: at once, and between runs of a push */
static int interleave(Dest *d) {
    struct pollfd p[2] = {{d->uffd, POLLIN, 0}, {d->urgent.closed ? -1 : d->urgent.fd, POLLIN, 0}};
    if (poll(p, 2, 0) <= 0) return 0;
    int rc = p[0].revents ? read_faults(d) : 0;
    return rc ? rc : p[1].revents ? pump(d, &d->urgent, SIZE_MAX) : 0;
}

/* parked until go_fd is readable (COMMIT): the thread exists before the guest runs, so
 * that starting it is not part of the downtime */
static int wait_for_go(Dest *d, int go_fd) {
    for (;;) {
        struct pollfd p[2] = {{d->stop_fd, POLLIN, 0}, {go_fd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (p[0].revents) return STOP_SEEN;
        if (p[1].revents) return 0;
    }
}

static int run_dest(Dest *d, int go_fd) {
    int rc = wait_for_go(d, go_fd);
    if (rc) return rc == STOP_SEEN ? R_STOPPED : rc;
    for (;;) {
        struct pollfd p[4] = {{d->stop_fd, POLLIN, 0}, {d->uffd, POLLIN, 0},
                              {d->urgent.closed ? -1 : d->urgent.fd, POLLIN, 0},
                              {d->main.closed ? -1 : d->main.fd, POLLIN, 0}};
        if (poll(p, 4, -1) < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (p[0].revents) return R_STOPPED;
        int rc = p[1].revents ? read_faults(d) : 0;
        if (!rc && p[2].revents) rc = pump(d, &d->urgent, SIZE_MAX);
        if (!rc && p[3].revents) rc = pump(d, &d->main, RECV_CHUNK);
        if (rc) return rc == STOP_SEEN ? R_STOPPED : rc;
    }
}

#define NBUF 8
static const char *const BUF_NAMES[NBUF] = {"owed", "minor", "received", "t_first", "t_sum",
                                            "nfault", "latency", "counters"};

static int run_with_buffers(Dest *d, int go_fd, Py_buffer *b) {
    size_t cap = meta_size(MAX_BATCH) + MAX_BATCH * PAGE;
    uint8_t *mbuf = malloc(cap), *ubuf = malloc(cap);
    int rc = -ENOMEM;
    if (mbuf && ubuf) {
        d->owed = b[0].buf; d->minor = b[1].buf; d->received = b[2].buf;
        d->t_first = b[3].buf; d->t_sum = b[4].buf; d->nfault = b[5].buf;
        d->lat = b[6].buf; d->lat_cap = b[6].len / 8; d->count = b[7].buf;
        d->main.buf = mbuf;
        d->urgent.buf = ubuf;
        Py_BEGIN_ALLOW_THREADS
        rc = run_dest(d, go_fd);
        Py_END_ALLOW_THREADS
    }
    free(mbuf);
    free(ubuf);
    return rc;
}

static PyObject *py_fault_loop(PyObject *self, PyObject *args) {
    unsigned long long base, alias;
    long long npages;
    int uffd, main_fd, urgent_fd, stop_fd, go_fd, done_fd;
    PyObject *o[NBUF];
    if (!PyArg_ParseTuple(args, "iiiiiiKKLOOOOOOOO", &uffd, &main_fd, &urgent_fd, &stop_fd,
                          &go_fd, &done_fd, &base, &alias, &npages, &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7]))
        return NULL;
    Py_ssize_t need[NBUF] = {npages, npages, npages, npages * 8, npages * 8, npages * 4, 0,
                             D_NCOUNT * 8};
    Py_buffer b[NBUF];
    int held = 0;
    while (held < NBUF && writable_buffer(o[held], &b[held], need[held], BUF_NAMES[held]) == 0)
        held++;
    Dest *d = held == NBUF ? calloc(1, sizeof(Dest)) : NULL;
    int rc = 0;
    if (d) {
        d->uffd = uffd; d->stop_fd = stop_fd; d->done_fd = done_fd;
        d->base = (uint8_t *)(uintptr_t)base;
        d->alias = (uint8_t *)(uintptr_t)alias;
        d->npages = npages;
        d->main = (Conn){.fd = main_fd, .which = FD_MAIN};
        d->urgent = (Conn){.fd = urgent_fd, .which = FD_URGENT};
        rc = run_with_buffers(d, go_fd, b);
        free(d);
    } else if (held == NBUF) {
        PyErr_NoMemory();
    }
    for (int i = 0; i < held; i++) PyBuffer_Release(&b[i]);
    return PyErr_Occurred() ? NULL : PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"serve_requests", py_serve_requests, METH_VARARGS,
     "serve_requests(sock, stop_fd, ram_addr, npages, owed, sent, counters) -> result code\n"
     "Answer PAGE_REQUEST records on `sock` from frozen RAM until stop_fd is readable."},
    {"fault_loop", py_fault_loop, METH_VARARGS,
     "fault_loop(uffd, main, urgent, stop_fd, go_fd, done_fd, base, alias, npages, owed,\n"
     "           minor, received, t_first, t_sum, nfault, latency, counters) -> result code\n"
     "Once go_fd is readable, serve userfaultfd faults and install pages until stop_fd is."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_faultpath",
    .m_doc = "Post-copy's fault path without the GIL.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__faultpath(void) { return PyModule_Create(&module); }
