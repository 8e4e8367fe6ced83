/*
 * netserve: a network server on a virtio-net NIC (legacy virtio over PCI), driven by polling.
 *
 * Finds the NIC on PCI bus 0 (1af4:1000, subsystem 1), places its I/O BAR if no firmware did,
 * sets up the receive and transmit queues with interrupts suppressed, and then polls: between
 * polls it halts until the next LAPIC timer tick (tick= us). It answers ARP for its address
 * (ip=), ICMP echo, and a UDP key-value protocol on port= (docs/guest-abi.md): values live in
 * a table in guest RAM, every reply carries the request's sequence number and the count of
 * requests served. CPU 0 sends a HEARTBEAT every hb= ms: counter = heartbeats, aux = requests
 * served. badqueue=1 points the receive queue outside RAM on purpose (to test the hypervisor).
 */
#include "rt.h"

const char wl_name[] = "netserve";
const u32 wl_id = WL_NETSERVE;

#define QMAX            256
#define BUF_SIZE        2048
#define NET_HDR         10
#define KV_MAGIC        0x564B4D4CU     /* "LMKV" */
#define KV_PUT          1
#define KV_GET          2
#define KV_REPLY        0x80
#define KV_OK           0
#define KV_BAD_KEY      1
#define KV_BAD_OP       2

static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }

struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vused { u32 id, len; };

struct vq {
        u32 n;
        struct vdesc *desc;
        volatile u16 *avail;            /* flags, idx, ring[n] */
        volatile u16 *used;             /* flags, idx, then struct vused[n] */
        u16 avail_idx, last_used;
        u8 *bufs;
};

static u8 rings[2][3 * 4096] __attribute__((aligned(4096)));
static u8 rxbufs[QMAX * BUF_SIZE] __attribute__((aligned(4096)));
static u8 txbufs[QMAX * BUF_SIZE] __attribute__((aligned(4096)));
static struct vq rxq, txq;
static u16 io;
static u8 mac[6], myip[4];
static u16 kv_port;
static u64 nkeys, served, ip_id, tick_count, hb_period, lapic_hz;
static u64 *values;
static int tx_queued;
static void tx_kick(void);

static inline volatile struct vused *used_elem(struct vq *q, u32 i)
{
        return (volatile struct vused *)(q->used + 2) + (i % q->n);
}

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u32 le32(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 le64(const u8 *p) { return (u64)le32(p) | (u64)le32(p + 4) << 32; }
static void put_le32(u8 *p, u32 v) { for (int i = 0; i < 4; i++) p[i] = (u8)(v >> (8 * i)); }
static void put_le64(u8 *p, u64 v) { for (int i = 0; i < 8; i++) p[i] = (u8)(v >> (8 * i)); }
static int same(const u8 *a, const u8 *b, u64 n) { while (n--) if (*a++ != *b++) return 0; return 1; }

static u16 csum(const u8 *p, u64 n)
{
        u64 s = 0;
        for (u64 i = 0; i + 1 < n; i += 2)
                s += be16(p + i);
        if (n & 1)
                s += (u64)p[n - 1] << 8;
        while (s >> 16)
                s = (s & 0xFFFF) + (s >> 16);
        return (u16)~s;
}

/* ---- PCI and virtio setup ---------------------------------------------------------------- */

static u32 pci_read(u32 dev, u32 reg)
{
        outl(0xCF8, 0x80000000U | dev << 11 | reg);
        return inl(0xCFC);
}

static void pci_write(u32 dev, u32 reg, u32 v)
{
        outl(0xCF8, 0x80000000U | dev << 11 | reg);
        outl(0xCFC, v);
}

static int find_nic(void)
{
        for (u32 d = 0; d < 32; d++) {
                if (pci_read(d, 0) != 0x10001AF4U || pci_read(d, 0x2C) >> 16 != 1)
                        continue;
                u32 bar = pci_read(d, 0x10);
                if (!(bar & 1))
                        return -1;
                if (!(bar & 0xFFFC))            /* no firmware placed it */
                        pci_write(d, 0x10, (u32)param("iobase", 0xC000));
                io = (u16)(pci_read(d, 0x10) & 0xFFFC);
                pci_write(d, 0x04, (pci_read(d, 0x04) & 0xFFFF) | 0x5);  /* I/O, bus master */
                kprintf("netserve info nic at 00:%02x.0 io=0x%x\n", d, io);
                return (int)d;
        }
        return -1;
}

static int setup_queue(u32 index, struct vq *q, u8 *bufs, int writable, u64 pfn_override)
{
        outw(io + 0x0E, (u16)index);
        u32 n = inw(io + 0x0C);
        if (n == 0 || n > QMAX || (n & (n - 1)))
                return -1;
        u8 *base = rings[index];
        u64 used_off = (16 * n + 6 + 2 * n + 4095) & ~4095UL;
        q->n = n;
        q->desc = (struct vdesc *)base;
        q->avail = (volatile u16 *)(base + 16 * n);
        q->used = (volatile u16 *)(base + used_off);
        q->bufs = bufs;
        q->avail[0] = 1;                        /* VRING_AVAIL_F_NO_INTERRUPT */
        for (u32 i = 0; i < n; i++) {
                q->desc[i].addr = (u64)(bufs + i * BUF_SIZE);
                q->desc[i].len = BUF_SIZE;
                q->desc[i].flags = writable ? 2 : 0;
                q->desc[i].next = 0;
                if (writable)
                        q->avail[2 + i] = (u16)i;
        }
        q->avail_idx = writable ? (u16)n : 0;
        barrier();
        q->avail[1] = q->avail_idx;
        outl(io + 0x08, (u32)(pfn_override ? pfn_override : (u64)base >> 12));
        return 0;
}

/* ---- transmit ---------------------------------------------------------------------------- */

/* A frame buffer for the next transmit slot (after the virtio-net header). */
static u8 *tx_frame(void)
{
        for (u64 spins = 0; (u16)(txq.avail_idx - txq.used[1]) >= txq.n; spins++) {
                if (spins == 0)
                        tx_kick();
                if (spins > 100000000UL)
                        return 0;
                cpu_relax();
        }
        u8 *b = txq.bufs + (txq.avail_idx % txq.n) * BUF_SIZE;
        memset(b, 0, NET_HDR);
        return b + NET_HDR;
}

/* Queue the frame; the device is told once per poll pass (tx_kick), not once per frame. */
static void tx_send(u64 len)
{
        u32 slot = txq.avail_idx % txq.n;
        txq.desc[slot].len = (u32)(NET_HDR + (len < 60 ? 60 : len));
        txq.avail[2 + slot] = (u16)slot;
        barrier();
        txq.avail[1] = ++txq.avail_idx;
        tx_queued = 1;
}

static void tx_kick(void)
{
        barrier();
        if (tx_queued && !(txq.used[0] & 1))    /* VRING_USED_F_NO_NOTIFY */
                outw(io + 0x10, 1);
        tx_queued = 0;
}

/* Start a reply frame to the sender of `in`; returns the buffer (Ethernet header written). */
static u8 *reply_eth(const u8 *in, u16 type)
{
        u8 *o = tx_frame();
        if (!o)
                return 0;
        memcpy(o, in + 6, 6);
        memcpy(o + 6, mac, 6);
        put16(o + 12, type);
        return o;
}

/* ---- protocols --------------------------------------------------------------------------- */

static void on_arp(const u8 *f, u64 len)
{
        const u8 *a = f + 14;
        if (len < 42 || be16(a) != 1 || be16(a + 2) != 0x0800 || be16(a + 6) != 1 ||
            !same(a + 24, myip, 4))
                return;
        u8 *o = reply_eth(f, 0x0806);
        if (!o)
                return;
        u8 *r = o + 14;
        memcpy(r, a, 6);                        /* htype, ptype, hlen, plen */
        put16(r + 6, 2);
        memcpy(r + 8, mac, 6);
        memcpy(r + 14, myip, 4);
        memcpy(r + 18, a + 8, 10);              /* their MAC and IP */
        memset(o + 42, 0, 18);
        tx_send(42);
}

/* A gratuitous ARP request for our address: switches learn where we are, neighbours our MAC. */
static void announce(void)
{
        u8 *o = tx_frame();
        if (!o)
                return;
        memset(o, 0xFF, 6);
        memcpy(o + 6, mac, 6);
        put16(o + 12, 0x0806);
        u8 *a = o + 14;
        put16(a, 1);
        put16(a + 2, 0x0800);
        a[4] = 6;
        a[5] = 4;
        put16(a + 6, 1);
        memcpy(a + 8, mac, 6);
        memcpy(a + 14, myip, 4);
        memset(a + 18, 0, 6);
        memcpy(a + 24, myip, 4);
        memset(o + 42, 0, 18);
        tx_send(42);
        tx_kick();
}

static void ip_header(u8 *ip, const u8 *dst, u8 proto, u64 total)
{
        ip[0] = 0x45;
        ip[1] = 0;
        put16(ip + 2, (u16)total);
        put16(ip + 4, (u16)++ip_id);
        put16(ip + 6, 0x4000);                  /* don't fragment */
        ip[8] = 64;
        ip[9] = proto;
        put16(ip + 10, 0);
        memcpy(ip + 12, myip, 4);
        memcpy(ip + 16, dst, 4);
        put16(ip + 10, csum(ip, 20));
}

static void on_icmp(const u8 *f, const u8 *ip, u64 ihl, u64 total)
{
        const u8 *icmp = ip + ihl;
        u64 n = total - ihl;
        if (n < 8 || icmp[0] != 8 || total > BUF_SIZE - NET_HDR - 14)
                return;
        u8 *o = reply_eth(f, 0x0800);
        if (!o)
                return;
        ip_header(o + 14, ip + 12, 1, 20 + n);
        u8 *r = o + 34;
        memcpy(r, icmp, n);
        r[0] = 0;
        put16(r + 2, 0);
        put16(r + 2, csum(r, n));
        tx_send(34 + n);
}

/* Request: magic u32, op u8, flags u8, u16, key u32, u32, seq u64, value u64 (32 bytes). */
static void on_kv(const u8 *f, const u8 *ip, const u8 *udp, u64 n)
{
        const u8 *q = udp + 8;
        if (n < 32 || le32(q) != KV_MAGIC)
                return;
        u8 op = q[4], status = KV_OK;
        u32 key = le32(q + 8);
        u64 value = 0;
        if (op != KV_PUT && op != KV_GET)
                status = KV_BAD_OP;
        else if (key >= nkeys)
                status = KV_BAD_KEY;
        else if (op == KV_PUT)
                values[key] = value = le64(q + 24);
        else
                value = values[key];
        served++;
        u8 *o = reply_eth(f, 0x0800);
        if (!o)
                return;
        u64 plen = 40;
        ip_header(o + 14, ip + 12, 17, 20 + 8 + plen);
        u8 *u = o + 34;
        put16(u, kv_port);
        memcpy(u + 2, udp, 2);                  /* their port */
        put16(u + 4, (u16)(8 + plen));
        put16(u + 6, 0);                        /* no UDP checksum (IPv4) */
        u8 *r = u + 8;
        memset(r, 0, plen);
        put_le32(r, KV_MAGIC);
        r[4] = op | KV_REPLY;
        r[5] = status;
        put_le32(r + 8, key);
        memcpy(r + 16, q + 16, 8);              /* the request's sequence number */
        put_le64(r + 24, value);
        put_le64(r + 32, served);
        tx_send(34 + 8 + plen);
}

static void on_ipv4(const u8 *f, u64 len)
{
        const u8 *ip = f + 14;
        if (len < 34 || ip[0] >> 4 != 4)
                return;
        u64 ihl = (u64)(ip[0] & 0xF) * 4, total = be16(ip + 2);
        if (ihl < 20 || total < ihl || 14 + total > len || !same(ip + 16, myip, 4) ||
            (be16(ip + 6) & 0x3FFF))            /* fragments are not served */
                return;
        if (ip[9] == 1)
                on_icmp(f, ip, ihl, total);
        else if (ip[9] == 17 && total >= ihl + 8 && be16(ip + ihl + 2) == kv_port)
                on_kv(f, ip, ip + ihl, total - ihl - 8);
}

static void on_frame(const u8 *f, u64 len)
{
        static const u8 bcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
        if (len < 14 || (!same(f, mac, 6) && !same(f, bcast, 6)))
                return;
        u16 type = be16(f + 12);
        if (type == 0x0806)
                on_arp(f, len);
        else if (type == 0x0800)
                on_ipv4(f, len);
}

/* Serve every frame received so far; give the buffers back. */
static void poll_rx(void)
{
        int reposted = 0;
        while (rxq.last_used != rxq.used[1]) {
                barrier();
                volatile struct vused *e = used_elem(&rxq, rxq.last_used);
                u32 id = e->id, len = e->len;
                if (id < rxq.n && len > NET_HDR && len <= BUF_SIZE)
                        on_frame(rxq.bufs + id * BUF_SIZE + NET_HDR, len - NET_HDR);
                rxq.avail[2 + rxq.avail_idx % rxq.n] = (u16)(id < rxq.n ? id : 0);
                barrier();
                rxq.avail[1] = ++rxq.avail_idx;
                rxq.last_used++;
                reposted = 1;
        }
        barrier();
        if (reposted && !(rxq.used[0] & 1))     /* the device may not need to be told */
                outw(io + 0x10, 0);
        tx_kick();
}

/* ---- workload ---------------------------------------------------------------------------- */

static int parse_ip(const char *s, u8 *out)
{
        for (int i = 0; i < 4; i++) {
                u32 v = 0, digits = 0;
                while (*s >= '0' && *s <= '9' && digits < 4) {
                        v = v * 10 + (u32)(*s++ - '0');
                        digits++;
                }
                if (!digits || v > 255 || (i < 3 ? *s++ != '.' : *s != 0))
                        return -1;
                out[i] = (u8)v;
        }
        return 0;
}

static void stop(const char *why)
{
        report_fail(0, 0, 0, "%s", why);
        halt_forever();
}

void wl_setup(void)
{
        char text[32];
        if (!param_str("ip", text, sizeof(text)))
                memcpy(text, "10.77.0.10", 11);
        if (parse_ip(text, myip))
                stop("ip= is not a dotted IPv4 address");
        kv_port = (u16)param("port", 7777);
        nkeys = param("keys", 65536);
        u64 got;
        values = (u64 *)alloc_region(nkeys * 8, &got);
        if (got < nkeys * 8)
                nkeys = got / 8;
        hb_period = ms_to_tsc(param("hb", 100));
        u64 tick_us = param("tick", 2000);
        lapic_hz = lapic_timer_calibrate();
        u64 c = lapic_hz / 1000000 * (tick_us ? tick_us : 1);
        tick_count = c > 0xFFFFFFFFUL ? 0xFFFFFFFFUL : c ? c : 1;
        if (find_nic() < 0)
                stop("no virtio-net NIC (1af4:1000) with an I/O BAR on PCI bus 0");
        outb(io + 0x12, 0);                     /* reset */
        outb(io + 0x12, 1);                     /* ACKNOWLEDGE */
        outb(io + 0x12, 3);                     /* DRIVER */
        outl(io + 0x04, inl(io + 0x00) & (1U << 5));    /* VIRTIO_NET_F_MAC only */
        if (setup_queue(0, &rxq, rxbufs, 1, param("badqueue", 0) ? 0xFFFFF : 0) ||
            setup_queue(1, &txq, txbufs, 0, 0))
                stop("the NIC's queue size is not a power of two up to 256");
        for (int i = 0; i < 6; i++)
                mac[i] = inb(io + 0x14 + i);
        outb(io + 0x12, 7);                     /* DRIVER_OK */
        outw(io + 0x10, 0);
        announce();
        kprintf("netserve info mac=%02x:%02x:%02x:%02x:%02x:%02x ip=%u.%u.%u.%u port=%u "
                "keys=%lu queues=%u/%u tick=%luus lapic=%luMHz\n", mac[0], mac[1], mac[2], mac[3], mac[4],
                mac[5], myip[0], myip[1], myip[2], myip[3], kv_port, nkeys, rxq.n, txq.n,
                tick_us, lapic_hz / 1000000);
}

void wl_run(u32 cpu)
{
        if (cpu != 0)
                halt_forever();
        u64 deadline = rdtsc() + hb_period, beats = 0;
        lapic_timer_periodic(TIMER_VECTOR, (u32)tick_count);
        __asm__ volatile("sti");
        for (;;) {
                poll_rx();
                if (periodic_due(&deadline, hb_period))
                        report_hb(0, ++beats, served);
                __asm__ volatile("hlt" ::: "memory");
        }
}
