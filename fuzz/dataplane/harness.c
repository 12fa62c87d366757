/* The shared part of the fuzz targets: guest memory with guard pages, the
 * input's guest-driver program, and the checking wrappers (see harness.h). */
#include "harness.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096u
#define GUARD (4 * PAGE)
#define REGIONS 4
/* Used ring elements filled and not yet flushed (net: one per receive buffer). */
#define MAX_FILLS 1024
#define HISTORY 1024
/* Bounded work per input: a program of at most this many steps, and this many
 * re-queued passes served after each step. */
#define MAX_STEPS 4096
#define MAX_REQUEUE_ROUNDS 1
/* Kicks and device operations per input: each may be a whole pass of the
 * device's work budget (balloon: 16384 frames), so a few dozen is plenty. */
#define MAX_ENTRIES 64

/* Guest-physical layout: gaps between regions; the last one ends at 2^64 so
 * that every address + length sum near the top is exercised. */
static const struct {
    uint64_t gpa;
    uint64_t size;
} layout[REGIONS] = {
    { 0x0, 0x10000 },                  /* rings (default layout) and buffers */
    { 0x20000, 0x4000 },               /* buffers, after a 64 KiB gap */
    { 0x100000000ull, 0x1000 },        /* above 4 GiB */
    { 0xfffffffffffff000ull, 0x1000 }, /* the last page of the address space */
};

struct svpy_guest_memory h_mem;
uint32_t h_faults;
uint32_t h_requeued;
static unsigned madvise_calls;
static unsigned entries; /* kicks and device operations this input */

static uint8_t *shadow[REGIONS];  /* what the guest wrote */
static uint8_t *allowed[REGIONS]; /* 1: the device may have written this byte */
/* Per page: CLEAN (all zero, untouched), DIRTY (written; compare byte by
 * byte), or OPEN (the device may have changed any byte: released pages). */
enum { CLEAN, DIRTY, OPEN };
static uint8_t *dirty[REGIONS];
static const uint8_t zero_page[PAGE];

struct h_head {
    uint32_t gen;      /* entries of older generations count as 0 */
    uint16_t held;     /* popped and not answered (a head may be listed twice) */
    uint64_t writable; /* the most writable bytes of those pops */
};

struct h_fill {
    uint32_t gen;
    uint16_t head;
    uint32_t written;
};

struct h_queue {
    /* Configuration the driver gave (applied at activation). */
    uint16_t size;
    uint8_t event_idx, indirect, ready;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    /* The driver's view. */
    uint16_t avail_idx;
    /* Chains answered since activation: used->idx must be exactly this. */
    uint16_t answered;
    /* What the device holds. */
    uint32_t gen;
    struct h_head heads[SVPY_VQ_MAX_SIZE];
    uint16_t history[HISTORY]; /* heads in pop order (for unpop) */
    unsigned history_len;
    struct h_fill fills[MAX_FILLS];
};

static const struct h_device *dev;
/* FUZZ_TRACE=1: every pop and answer on stderr (to see what a seed does). */
static int trace = -1;
#define TRACE(...)                                                                        \
    do {                                                                                  \
        if (trace > 0)                                                                    \
            fprintf(stderr, __VA_ARGS__);                                                 \
    } while (0)
static struct h_queue queues[H_MAX_QUEUES];
static unsigned current_queue;

void h_fail(const char *file, int line, const char *cond, const char *fmt, ...)
{
    va_list args;

    fprintf(stderr, "\n== invariant broken at %s:%d: %s\n== ", file, line, cond);
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
    abort();
}

/* --- input ---------------------------------------------------------------- */

bool h_more(const struct h_reader *r)
{
    return r->pos < r->size;
}

uint8_t h_u8(struct h_reader *r)
{
    return r->pos < r->size ? r->data[r->pos++] : 0;
}

uint16_t h_u16(struct h_reader *r)
{
    uint16_t lo = h_u8(r);

    return (uint16_t)(lo | h_u8(r) << 8);
}

uint32_t h_u32(struct h_reader *r)
{
    uint32_t lo = h_u16(r);

    return lo | (uint32_t)h_u16(r) << 16;
}

uint64_t h_u64(struct h_reader *r)
{
    uint64_t lo = h_u32(r);

    return lo | (uint64_t)h_u32(r) << 32;
}

size_t h_take(struct h_reader *r, const uint8_t **out, size_t want)
{
    size_t left = r->size - r->pos;

    if (want > left)
        want = left;
    *out = r->data + r->pos;
    r->pos += want;
    return want;
}

uint64_t h_gpa(struct h_reader *r)
{
    uint8_t b = h_u8(r);
    uint16_t offset = h_u16(r);
    uint64_t base = layout[b & 3].gpa;

    /* Below a region: a gap, or for region 0 a wrap to the top of the space. */
    return (b & 0x80) ? base - 1 - offset : base + offset;
}

bool h_fault(unsigned bit)
{
    return h_faults & (1u << bit);
}

/* --- guest memory ----------------------------------------------------------- */

static void init_memory(void)
{
    static bool done;

    if (done)
        return;
    h_mem.count = REGIONS;
    for (unsigned i = 0; i < REGIONS; i++) {
        uint8_t *base = mmap(NULL, layout[i].size + 2 * GUARD, PROT_NONE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

        if (base == MAP_FAILED || mprotect(base + GUARD, layout[i].size,
                                           PROT_READ | PROT_WRITE) < 0) {
            perror("guest memory");
            abort();
        }
        h_mem.regions[i].gpa = layout[i].gpa;
        h_mem.regions[i].size = layout[i].size;
        h_mem.regions[i].hva = base + GUARD;
        shadow[i] = calloc(1, layout[i].size);
        allowed[i] = calloc(1, layout[i].size);
        dirty[i] = calloc(1, layout[i].size / PAGE);
        if (!shadow[i] || !allowed[i] || !dirty[i])
            abort();
    }
    done = true;
}

static void mark_dirty(unsigned region, uint64_t offset, uint64_t len)
{
    if (!len)
        return;
    for (uint64_t page = offset / PAGE; page <= (offset + len - 1) / PAGE; page++)
        if (dirty[region][page] == CLEAN)
            dirty[region][page] = DIRTY;
}

/* The region holding guest address gpa, or -1. */
static int region_of_gpa(uint64_t gpa)
{
    for (unsigned i = 0; i < REGIONS; i++)
        if (gpa >= layout[i].gpa && gpa - layout[i].gpa < layout[i].size)
            return (int)i;
    return -1;
}

static int region_of_host(const void *ptr, size_t len, uint64_t *offset)
{
    uintptr_t p = (uintptr_t)ptr;

    for (unsigned i = 0; i < REGIONS; i++) {
        uintptr_t start = (uintptr_t)h_mem.regions[i].hva;

        if (p >= start && p - start < layout[i].size && len <= layout[i].size - (p - start)) {
            *offset = p - start;
            return (int)i;
        }
    }
    return -1;
}

bool h_in_guest(const void *ptr, size_t len)
{
    uint64_t offset;

    return region_of_host(ptr, len, &offset) >= 0;
}

void h_allow_write(const void *ptr, size_t len)
{
    uint64_t offset;
    int region = region_of_host(ptr, len, &offset);

    H_CHECK(region >= 0, "device range %p+%zu outside guest RAM", ptr, len);
    while (len) {
        uint64_t page = offset / PAGE, in_page = PAGE - offset % PAGE;

        if (in_page > len)
            in_page = len;
        if (in_page == PAGE) {
            dirty[region][page] = OPEN; /* a whole page: no byte map needed */
        } else if (dirty[region][page] != OPEN) {
            memset(allowed[region] + offset, 1, in_page);
            dirty[region][page] = DIRTY;
        }
        offset += in_page;
        len -= in_page;
    }
}

/* MADV_DONTNEED's effect on private memory, without the system call. */
static void zero_pages(void *addr, size_t len)
{
    uint64_t offset;
    int region = region_of_host(addr, len, &offset);

    for (uint64_t page = offset / PAGE; page < (offset + len) / PAGE; page++)
        if (dirty[region][page] != CLEAN) /* a clean page is all zeros already */
            memset(h_mem.regions[region].hva + page * PAGE, 0, PAGE);
}

/* A driver's write: what lands outside RAM goes nowhere. */
static void guest_store(uint64_t gpa, const void *src, uint8_t fill, size_t len)
{
    const uint8_t *from = src;

    for (unsigned pieces = 0; len && pieces < REGIONS + 1; pieces++) {
        int region = region_of_gpa(gpa);
        uint64_t offset, chunk;

        if (region < 0)
            return;
        offset = gpa - layout[region].gpa;
        chunk = layout[region].size - offset;
        if (chunk > len)
            chunk = len;
        if (from) {
            memcpy(h_mem.regions[region].hva + offset, from, chunk);
            memcpy(shadow[region] + offset, from, chunk);
            from += chunk;
        } else {
            memset(h_mem.regions[region].hva + offset, fill, chunk);
            memset(shadow[region] + offset, fill, chunk);
        }
        mark_dirty((unsigned)region, offset, chunk);
        gpa += chunk; /* may wrap from the top of the space to region 0 */
        len -= chunk;
    }
}

void h_guest_write(uint64_t gpa, const void *src, size_t len)
{
    guest_store(gpa, src, 0, len);
}

/* Every byte the device changed was its to change; then back to all zeros. */
static void check_and_reset_memory(void)
{
    for (unsigned i = 0; i < REGIONS; i++) {
        uint8_t *real = h_mem.regions[i].hva;

        for (uint64_t page = 0; page < layout[i].size / PAGE; page++) {
            uint64_t start = page * PAGE;

            if (dirty[i][page] == CLEAN) {
                H_CHECK(memcmp(real + start, zero_page, PAGE) == 0,
                        "device wrote to region %u page %lu, not a writable buffer", i,
                        (unsigned long)page);
                continue;
            }
            if (dirty[i][page] == DIRTY && memcmp(real + start, shadow[i] + start, PAGE) != 0) {
                for (uint64_t b = start; b < start + PAGE; b++)
                    H_CHECK(real[b] == shadow[i][b] || allowed[i][b],
                            "device wrote guest byte %#lx (region %u), not in a writable "
                            "buffer or used ring", (unsigned long)(layout[i].gpa + b), i);
            }
            memset(real + start, 0, PAGE);
            memset(shadow[i] + start, 0, PAGE);
            memset(allowed[i] + start, 0, PAGE);
            dirty[i][page] = CLEAN;
        }
    }
}

/* --- queue bookkeeping ------------------------------------------------------ */

static struct h_queue *tracking(const struct svpy_virtqueue *vq)
{
    for (unsigned q = 0; q < dev->num_queues; q++)
        if (dev->queue(q) == vq)
            return &queues[q];
    h_fail(__FILE__, __LINE__, "tracking", "a queue the device does not have");
}

static struct h_head *head_of(struct h_queue *hq, uint16_t head)
{
    struct h_head *h = &hq->heads[head];

    if (h->gen != hq->gen) {
        h->gen = hq->gen;
        h->held = 0;
        h->writable = 0;
    }
    return h;
}

void h_forget_chains(void)
{
    for (unsigned q = 0; q < H_MAX_QUEUES; q++) {
        queues[q].gen++;
        queues[q].history_len = 0;
    }
}

static void check_chain(const struct svpy_virtqueue *vq, const struct svpy_chain *chain)
{
    uint64_t readable = 0, writable = 0;
    unsigned count = (unsigned)chain->readable + chain->writable;

    H_CHECK(chain->head < vq->size, "head %u of a queue of %u", chain->head, vq->size);
    H_CHECK(count <= SVPY_CHAIN_MAX_SEGMENTS, "%u segments", count);
    for (unsigned i = 0; i < count; i++) {
        const struct iovec *iov = &chain->iov[i];

        /* Zero-length descriptors are skipped: every segment holds a byte
         * (net's header parsing relies on it). */
        H_CHECK(iov->iov_len > 0, "empty segment %u", i);
        H_CHECK(h_in_guest(iov->iov_base, iov->iov_len), "segment %u (%p+%zu) not in guest RAM",
                i, iov->iov_base, iov->iov_len);
        if (i < chain->readable)
            readable += iov->iov_len;
        else
            writable += iov->iov_len;
    }
    H_CHECK(readable == chain->readable_bytes && writable == chain->writable_bytes,
            "byte counts %lu/%lu, segments say %lu/%lu", (unsigned long)chain->readable_bytes,
            (unsigned long)chain->writable_bytes, (unsigned long)readable,
            (unsigned long)writable);
}

int harness_vq_pop(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem,
                   struct svpy_chain *chain)
{
    struct h_queue *hq = tracking(vq);
    uint16_t before = vq->last_avail_idx;
    struct h_head *h;
    int ret;

    H_CHECK(__atomic_load_n(dev->broken, __ATOMIC_SEQ_CST) == 0,
            "a broken device (error %d) popped a chain", *dev->broken);
    ret = svpy_vq_pop(vq, mem, chain);
    TRACE("q%u pop -> %d", (unsigned)(hq - queues), ret);
    if (ret == 1)
        TRACE(" head %u, %u+%u segments, %lu+%lu bytes", chain->head, chain->readable,
              chain->writable, (unsigned long)chain->readable_bytes,
              (unsigned long)chain->writable_bytes);
    TRACE("\n");
    if (ret <= 0) {
        H_CHECK(vq->last_avail_idx == before, "a failed pop moved last_avail_idx");
        H_CHECK(ret >= -SVPY_VQ_ERR_REQUEST, "pop returned %d", ret);
        return ret;
    }
    H_CHECK(ret == 1, "pop returned %d", ret);
    H_CHECK(vq->last_avail_idx == (uint16_t)(before + 1), "pop moved last_avail_idx by %u",
            (uint16_t)(vq->last_avail_idx - before));
    check_chain(vq, chain);
    for (unsigned i = chain->readable; i < chain->readable + chain->writable; i++)
        h_allow_write(chain->iov[i].iov_base, chain->iov[i].iov_len);
    h = head_of(hq, chain->head);
    h->held++;
    if (chain->writable_bytes > h->writable)
        h->writable = chain->writable_bytes;
    if (hq->history_len == HISTORY) {
        memmove(hq->history, hq->history + 1, sizeof(hq->history) - sizeof(hq->history[0]));
        hq->history_len--;
    }
    hq->history[hq->history_len++] = chain->head;
    return ret;
}

/* One answer for a chain the device holds, with no more bytes than it had room for. */
static void answer(struct h_queue *hq, uint16_t head, uint32_t written)
{
    struct h_head *h;

    H_CHECK(head < hq->size, "answered head %u of a queue of %u", head, hq->size);
    h = head_of(hq, head);
    H_CHECK(h->held > 0, "answered head %u, which it does not hold", head);
    H_CHECK(written <= h->writable, "said it wrote %u bytes into head %u, which has %lu writable",
            written, head, (unsigned long)h->writable);
}

/* used->idx counts exactly the chains answered (nothing skipped or repeated). */
static void check_used_idx(struct h_queue *hq, struct svpy_virtqueue *vq)
{
    H_CHECK(vq->used->idx == hq->answered && vq->used_idx == hq->answered,
            "used->idx %u (device's %u) after %u answers", vq->used->idx, vq->used_idx,
            hq->answered);
}

static void check_used(struct svpy_virtqueue *vq, uint16_t back, uint16_t head, uint32_t written)
{
    const struct virtq_used_elem *elem = &vq->used->ring[(uint16_t)(vq->used_idx - back) %
                                                         vq->size];

    H_CHECK(elem->id == head && elem->len == written, "used element {%u,%u}, pushed {%u,%u}",
            elem->id, elem->len, head, written);
}

void harness_vq_push(struct svpy_virtqueue *vq, uint16_t head, uint32_t written)
{
    struct h_queue *hq = tracking(vq);

    H_CHECK(vq->active && vq->used, "push on an inactive queue");
    answer(hq, head, written);
    TRACE("q%u push head %u len %u\n", (unsigned)(hq - queues), head, written);
    svpy_vq_push(vq, head, written);
    hq->answered++;
    check_used_idx(hq, vq);
    check_used(vq, 1, head, written);
    head_of(hq, head)->held--;
}

void harness_vq_unpop(struct svpy_virtqueue *vq, uint16_t count)
{
    struct h_queue *hq = tracking(vq);
    uint16_t before = vq->last_avail_idx;

    H_CHECK(count <= hq->history_len, "gave back %u chains, popped %u", count,
            hq->history_len);
    for (uint16_t i = 0; i < count; i++) {
        struct h_head *h = head_of(hq, hq->history[--hq->history_len]);

        H_CHECK(h->held > 0, "gave back a chain it had answered");
        h->held--;
    }
    svpy_vq_unpop(vq, count);
    H_CHECK(vq->last_avail_idx == (uint16_t)(before - count), "unpop");
}

void harness_vq_fill(struct svpy_virtqueue *vq, uint16_t offset, uint16_t head, uint32_t written)
{
    struct h_queue *hq = tracking(vq);

    H_CHECK(vq->active && vq->used, "fill on an inactive queue");
    H_CHECK(offset < MAX_FILLS, "fill at offset %u", offset);
    answer(hq, head, written);
    hq->fills[offset] = (struct h_fill){ hq->gen, head, written };
    svpy_vq_fill(vq, offset, head, written);
    /* Checked now: what the device copies next may land on the used ring (a
     * guest may lend it as a buffer), which is the guest's own loss. */
    {
        const struct virtq_used_elem *elem =
            &vq->used->ring[(uint16_t)(vq->used_idx + offset) % vq->size];

        H_CHECK(elem->id == head && elem->len == written, "filled {%u,%u}, wrote {%u,%u}",
                elem->id, elem->len, head, written);
    }
}

void harness_vq_flush(struct svpy_virtqueue *vq, uint16_t count)
{
    struct h_queue *hq = tracking(vq);

    H_CHECK(vq->active && vq->used, "flush on an inactive queue");
    H_CHECK(count <= MAX_FILLS, "flush of %u", count);
    TRACE("q%u flush %u\n", (unsigned)(hq - queues), count);
    for (uint16_t i = 0; i < count; i++) {
        struct h_fill *fill = &hq->fills[i];

        H_CHECK(fill->gen == hq->gen, "flushed used element %u, never filled", i);
        answer(hq, fill->head, fill->written);
        head_of(hq, fill->head)->held--;
    }
    svpy_vq_flush(vq, count);
    hq->answered = (uint16_t)(hq->answered + count);
    check_used_idx(hq, vq);
    for (uint16_t i = 0; i < count; i++)
        hq->fills[i].gen = hq->gen - 1;
}

void harness_device_requeue(struct svpy_device *device, unsigned queue)
{
    (void)device;
    H_CHECK(queue < dev->num_queues, "requeue of queue %u", queue);
    h_requeued |= 1u << queue;
}

int harness_madvise(void *addr, size_t len, int advice)
{
    /* Page advice may only ever touch guest RAM, whole pages of it. */
    H_CHECK(((uintptr_t)addr & (PAGE - 1)) == 0 && (len & (PAGE - 1)) == 0,
            "madvise(%p, %zu) not page aligned", addr, len);
    H_CHECK(len > 0 && h_in_guest(addr, len), "madvise(%p, %zu) outside guest RAM", addr, len);
    h_allow_write(addr, len);
    /* The first calls of each input are the real thing; after them the
     * effect is reproduced without a system call (a guest listing thousands
     * of scattered frames would otherwise make this target too slow to fuzz). */
    if (madvise_calls++ < 16)
        return madvise(addr, len, advice);
    if (advice == MADV_DONTNEED) {
        zero_pages(addr, len); /* private anonymous memory reads back as zeros */
        return 0;
    }
    errno = EINVAL; /* MADV_REMOVE on private memory */
    return -1;
}

/* --- the driver's program ----------------------------------------------------- */

static void default_config(unsigned q, uint8_t cfg)
{
    struct h_queue *hq = &queues[q];
    uint64_t size = 1u << ((cfg & 0x0f) % 9);
    uint64_t desc_bytes = 16 * size;
    uint64_t used_off = (desc_bytes + 6 + 2 * size + 3) & ~3ull;
    uint64_t stride = (used_off + 6 + 8 * size + 63) & ~63ull;

    hq->size = (uint16_t)size;
    hq->event_idx = (cfg >> 4) & 1;
    hq->indirect = (cfg >> 5) & 1;
    hq->ready = 1;
    /* Each queue's rings back to back at the start of region 0. */
    hq->desc_gpa = layout[0].gpa + q * stride;
    hq->avail_gpa = hq->desc_gpa + desc_bytes;
    hq->used_gpa = hq->desc_gpa + used_off;
}

static void activate(unsigned q)
{
    struct h_queue *hq = &queues[q];
    struct svpy_virtqueue *vq = dev->queue(q);

    vq->size = hq->size;
    vq->event_idx = hq->event_idx;
    vq->indirect = hq->indirect;
    vq->desc_gpa = hq->desc_gpa;
    vq->avail_gpa = hq->avail_gpa;
    vq->used_gpa = hq->used_gpa;
    hq->avail_idx = 0;
    hq->answered = 0;
    hq->gen++;
    hq->history_len = 0;
    if (!hq->ready) {
        svpy_vq_deactivate(vq);
        return;
    }
    if (svpy_vq_activate(vq, &h_mem) == SVPY_VQ_OK) {
        H_CHECK(h_in_guest(vq->desc, 16u * vq->size) && h_in_guest(vq->avail, 6u + 2 * vq->size),
                "rings outside guest RAM");
        h_allow_write(vq->used, 6u + 8 * vq->size);
        if (dev->activated)
            dev->activated(q);
    } else {
        H_CHECK(!vq->active, "an activation that failed left the queue active");
    }
}

static void serve_requeues(void)
{
    for (unsigned round = 0; round < MAX_REQUEUE_ROUNDS && h_requeued; round++) {
        uint32_t pending = h_requeued;

        h_requeued = 0;
        for (unsigned q = 0; q < dev->num_queues; q++)
            if (pending & (1u << q))
                dev->notify(q);
    }
    h_requeued = 0;
}

static uint32_t desc_len(uint16_t len, uint8_t flags)
{
    /* Bit 7 of the flags byte: a large length (up to 2^31). */
    return (flags & 0x80) ? (uint32_t)len << 16 : len;
}

static void write_desc(uint64_t gpa, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    struct virtq_desc desc = { addr, len, flags, next };

    h_guest_write(gpa, &desc, sizeof(desc));
}

static void make_available(struct h_queue *hq, uint16_t head)
{
    h_guest_write(hq->avail_gpa + 4 + 2 * (uint64_t)(hq->avail_idx % hq->size), &head, 2);
    hq->avail_idx++;
    h_guest_write(hq->avail_gpa + 2, &hq->avail_idx, 2);
}

enum {
    OP_DESC,       /* one descriptor of the current queue's table */
    OP_DESC_AT,    /* one descriptor anywhere (an indirect table) */
    OP_AVAIL,      /* a head into the available ring */
    OP_AVAIL_IDX,  /* move the available index by a signed amount */
    OP_WRITE,      /* bytes into guest memory */
    OP_FILL,       /* a run of one byte */
    OP_RING_FLAGS, /* avail flags and used_event */
    OP_KICK,       /* notify a queue */
    OP_QUEUE,      /* select the current queue */
    OP_SETUP,      /* reset the device and set a queue up anew */
    OP_CHAIN,      /* a whole chain of linked descriptors, made available */
    OP_INDIRECT,   /* an indirect table and its descriptor, made available */
    OP_GENERIC_COUNT
};

static void step(struct h_reader *r)
{
    unsigned code = h_u8(r) % (OP_GENERIC_COUNT + dev->num_ops);
    struct h_queue *hq = &queues[current_queue];

    switch (code) {
    case OP_DESC: {
        uint16_t index = h_u16(r) % hq->size;
        uint64_t addr = h_gpa(r);
        uint16_t len = h_u16(r);
        uint8_t flags = h_u8(r);
        uint16_t next = h_u16(r);

        write_desc(hq->desc_gpa + 16 * (uint64_t)index, addr, desc_len(len, flags), flags & 0x7f,
                   next);
        break;
    }
    case OP_DESC_AT: {
        uint64_t table = h_gpa(r);
        uint8_t index = h_u8(r);
        uint64_t addr = h_gpa(r);
        uint16_t len = h_u16(r);
        uint8_t flags = h_u8(r);
        uint16_t next = h_u16(r);

        write_desc(table + 16 * (uint64_t)index, addr, desc_len(len, flags), flags & 0x7f, next);
        break;
    }
    case OP_AVAIL:
        make_available(hq, h_u16(r));
        break;
    case OP_AVAIL_IDX:
        hq->avail_idx = (uint16_t)(hq->avail_idx + (int8_t)h_u8(r));
        h_guest_write(hq->avail_gpa + 2, &hq->avail_idx, 2);
        break;
    case OP_WRITE: {
        uint64_t gpa = h_gpa(r);
        const uint8_t *bytes;
        size_t len = h_take(r, &bytes, h_u8(r));

        h_guest_write(gpa, bytes, len);
        break;
    }
    case OP_FILL: {
        uint64_t gpa = h_gpa(r);
        uint16_t len = h_u16(r);

        guest_store(gpa, NULL, h_u8(r), len);
        break;
    }
    case OP_RING_FLAGS: {
        uint16_t flags = h_u16(r), used_event = h_u16(r);

        h_guest_write(hq->avail_gpa, &flags, 2);
        h_guest_write(hq->avail_gpa + 4 + 2 * (uint64_t)hq->size, &used_event, 2);
        break;
    }
    case OP_KICK: {
        int32_t broken = *dev->broken;

        entries++;
        dev->notify(h_u8(r) % dev->num_queues);
        serve_requeues();
        H_CHECK(!broken || *dev->broken == broken, "broken changed from %d to %d", broken,
                *dev->broken);
        break;
    }
    case OP_QUEUE:
        current_queue = h_u8(r) % dev->num_queues;
        break;
    case OP_SETUP: {
        uint8_t cfg = h_u8(r);

        entries++;
        dev->reset();
        h_forget_chains();
        default_config(current_queue, cfg);
        hq->ready = !(cfg & 0x80);
        if (cfg & 0x40) {
            hq->desc_gpa = h_gpa(r);
            hq->avail_gpa = h_gpa(r);
            hq->used_gpa = h_gpa(r);
        }
        for (unsigned q = 0; q < dev->num_queues; q++)
            activate(q);
        dev->start();
        serve_requeues();
        break;
    }
    case OP_CHAIN: {
        uint16_t slot = h_u8(r) % hq->size;
        unsigned count = h_u8(r) % 8 + 1;

        for (unsigned i = 0; i < count; i++) {
            uint64_t addr = h_gpa(r);
            uint16_t len = h_u16(r);
            uint8_t flags = h_u8(r);
            uint16_t kind = (flags & 1 ? VIRTQ_DESC_F_WRITE : 0) |
                            (flags & 2 ? VIRTQ_DESC_F_INDIRECT : 0) |
                            (i + 1 < count ? VIRTQ_DESC_F_NEXT : 0);

            write_desc(hq->desc_gpa + 16 * (uint64_t)((slot + i) % hq->size), addr,
                       desc_len(len, flags), kind, (uint16_t)((slot + i + 1) % hq->size));
        }
        make_available(hq, slot);
        break;
    }
    case OP_INDIRECT: {
        uint16_t slot = h_u8(r) % hq->size;
        uint64_t table = h_gpa(r);
        unsigned count = h_u8(r) % 8 + 1;

        for (unsigned i = 0; i < count; i++) {
            uint64_t addr = h_gpa(r);
            uint16_t len = h_u16(r);
            uint8_t flags = h_u8(r);
            uint16_t kind = (flags & 1 ? VIRTQ_DESC_F_WRITE : 0) |
                            (i + 1 < count ? VIRTQ_DESC_F_NEXT : 0);

            write_desc(table + 16 * (uint64_t)i, addr, desc_len(len, flags), kind,
                       (uint16_t)(i + 1));
        }
        write_desc(hq->desc_gpa + 16 * (uint64_t)slot, table, 16 * count, VIRTQ_DESC_F_INDIRECT,
                   0);
        make_available(hq, slot);
        break;
    }
    default: {
        int32_t broken = *dev->broken;

        entries++;
        dev->op(code - OP_GENERIC_COUNT, r);
        serve_requeues();
        H_CHECK(!broken || *dev->broken == broken, "broken changed from %d to %d", broken,
                *dev->broken);
        break;
    }
    }
}

void h_run(const struct h_device *device, const uint8_t *data, size_t size)
{
    struct h_reader r = { data, size, 0 };
    uint8_t cfg;

    init_memory();
    if (trace < 0)
        trace = getenv("FUZZ_TRACE") != NULL;
    dev = device;
    h_faults = 0;
    h_requeued = 0;
    madvise_calls = 0;
    current_queue = 0;
    cfg = h_u8(&r);
    for (unsigned q = 0; q < dev->num_queues; q++)
        default_config(q, cfg);
    h_forget_chains();
    dev->begin(&r);
    for (unsigned q = 0; q < dev->num_queues; q++)
        activate(q);
    dev->start();
    serve_requeues();
    entries = 0;
    for (unsigned steps = 0; h_more(&r) && steps < MAX_STEPS && entries < MAX_ENTRIES; steps++)
        step(&r);
    dev->end();
    TRACE("end: broken %d\n", *dev->broken);
    h_requeued = 0;
    check_and_reset_memory();
}
