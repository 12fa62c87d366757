/* The split-ring walker itself (virtqueue.c), driven by a device the input
 * plays: pops, answers in any order, gives chains back, fills and flushes
 * batches, turns notifications off and on, asks whether to interrupt; over
 * two queues on the same memory, direct and indirect chains, event_idx on
 * and off.  Besides the harness's checks (chains inside guest RAM, segment
 * order and counts, the used ring as pushed), the notification answers are
 * compared with the spec's formulas computed here. */
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#define QUEUES 2
#define HELD 256

struct held {
    uint16_t head;
    uint8_t answered;
    uint32_t writable;
};

static struct svpy_virtqueue vqs[QUEUES];
static int32_t broken;
static struct svpy_chain chain;
/* Chains the device holds, per queue, in pop order. */
static struct held held[QUEUES][HELD];
static unsigned held_len[QUEUES];
/* held[q][barrier..] were popped after the last chain answered: only those may
 * be given back (unpop returns the most recent pops). */
static unsigned barrier[QUEUES];
/* vring_need_event's state, kept here independently of the queue's. */
static uint16_t signalled[QUEUES];
static bool signalled_valid[QUEUES];

static struct svpy_virtqueue *vq_queue(unsigned q)
{
    return &vqs[q];
}

static void vq_activated(unsigned q)
{
    held_len[q] = barrier[q] = 0;
    signalled_valid[q] = false;
}

static void vq_begin(struct h_reader *r)
{
    (void)r;
    broken = 0;
    memset(vqs, 0, sizeof(vqs));
    memset(held_len, 0, sizeof(held_len));
    memset(barrier, 0, sizeof(barrier));
}

static void vq_start(void)
{
}

static void vq_reset(void)
{
    for (unsigned q = 0; q < QUEUES; q++) {
        svpy_vq_deactivate(&vqs[q]);
        held_len[q] = barrier[q] = 0;
    }
    broken = 0;
}

/* One pop; an error breaks the "device", after checking it is repeatable
 * (a refused chain leaves the queue where it was). */
static int pop(unsigned q)
{
    struct svpy_virtqueue *vq = &vqs[q];
    int ret;

    if (broken || held_len[q] == HELD)
        return 0;
    ret = harness_vq_pop(vq, &h_mem, &chain);
    if (ret < 0) {
        uint16_t last = vq->last_avail_idx;
        int again = svpy_vq_pop(vq, &h_mem, &chain);

        H_CHECK(again == ret && vq->last_avail_idx == last, "pop gave %d, then %d", ret, again);
        broken = -ret;
        return ret;
    }
    if (ret == 1)
        held[q][held_len[q]++] = (struct held){ chain.head, 0,
                                                chain.writable_bytes > UINT32_MAX
                                                    ? UINT32_MAX
                                                    : (uint32_t)chain.writable_bytes };
    return ret;
}

static void compact(unsigned q)
{
    unsigned kept = 0, new_barrier = 0;

    for (unsigned i = 0; i < held_len[q]; i++) {
        if (i == barrier[q] && kept > new_barrier)
            new_barrier = kept;
        if (!held[q][i].answered)
            held[q][kept++] = held[q][i];
        else if (kept > new_barrier)
            new_barrier = kept;
    }
    /* A barrier past the last entry: everything kept was popped before it. */
    if (barrier[q] >= held_len[q])
        new_barrier = kept;
    held_len[q] = kept;
    barrier[q] = new_barrier;
}

static void push(unsigned q, unsigned which, uint32_t len)
{
    struct held *h;

    if (!held_len[q] || !vqs[q].active)
        return;
    h = &held[q][which % held_len[q]];
    harness_vq_push(&vqs[q], h->head, len % (h->writable + 1ull));
    h->answered = 1;
    compact(q);
}

static bool expected_interrupt(unsigned q)
{
    struct svpy_virtqueue *vq = &vqs[q];
    uint16_t new_idx = vq->used_idx, old = signalled[q], event;
    bool valid = signalled_valid[q];

    if (!vq->active)
        return false;
    if (!vq->event_idx)
        return !(vq->avail->flags & VIRTQ_AVAIL_F_NO_INTERRUPT);
    event = vq->avail->ring[vq->size];
    signalled[q] = new_idx;
    signalled_valid[q] = true;
    /* Interrupt when used_event is in (old, new]; always the first time. */
    return !valid || (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* A device's whole pass: everything available, answered at once. */
static void vq_notify(unsigned q)
{
    struct svpy_virtqueue *vq = &vqs[q];
    unsigned rounds = 0;

    if (broken || !vq->active)
        return;
    do {
        svpy_vq_disable_notify(vq);
        if (!vq->event_idx)
            H_CHECK(vq->used->flags & VIRTQ_USED_F_NO_NOTIFY, "notifications still on");
        while (held_len[q] < HELD && pop(q) == 1)
            push(q, held_len[q] - 1, UINT32_MAX);
        if (broken)
            return;
    } while (svpy_vq_enable_notify(vq) && ++rounds < 4);
    H_CHECK(expected_interrupt(q) == svpy_vq_should_interrupt(vq), "should_interrupt");
}

static void vq_op(unsigned code, struct h_reader *r)
{
    unsigned q = h_u8(r) % QUEUES;
    struct svpy_virtqueue *vq = &vqs[q];

    switch (code) {
    case 0:
        pop(q);
        break;
    case 1: {
        uint8_t which = h_u8(r);

        push(q, which, h_u32(r));
        break;
    }
    case 2: { /* give back the last chains popped, if unanswered */
        unsigned count = h_u8(r) % 4 + 1;

        if (count > held_len[q] - barrier[q] || !vq->active)
            break;
        harness_vq_unpop(vq, (uint16_t)count);
        held_len[q] -= count;
        break;
    }
    case 3: { /* answer a batch: fill each, then publish them together */
        unsigned count = h_u8(r) % 8 + 1;
        uint32_t len = h_u32(r);

        if (count > held_len[q] || !vq->active)
            break;
        for (unsigned i = 0; i < count; i++) {
            struct held *h = &held[q][i];

            harness_vq_fill(vq, (uint16_t)i, h->head, len % (h->writable + 1ull));
            h->answered = 1;
        }
        harness_vq_flush(vq, (uint16_t)count);
        compact(q);
        break;
    }
    case 4:
        svpy_vq_disable_notify(vq);
        if (vq->active && !vq->event_idx)
            H_CHECK(vq->used->flags & VIRTQ_USED_F_NO_NOTIFY, "notifications still on");
        break;
    case 5: {
        bool more = svpy_vq_enable_notify(vq);

        if (vq->active) {
            H_CHECK(more == (vq->avail->idx != vq->last_avail_idx), "enable_notify said %d", more);
            if (vq->event_idx)
                H_CHECK(*(uint16_t *)&vq->used->ring[vq->size] == vq->last_avail_idx,
                        "avail_event not set");
            else
                H_CHECK(!(vq->used->flags & VIRTQ_USED_F_NO_NOTIFY), "notifications still off");
        } else {
            H_CHECK(!more, "an inactive queue has more");
        }
        break;
    }
    case 6: {
        uint16_t seen = h_u16(r);
        bool more = svpy_vq_enable_notify_after(vq, seen);

        H_CHECK(!vq->active || more == (vq->avail->idx != seen), "enable_notify_after");
        break;
    }
    case 7:
        H_CHECK(expected_interrupt(q) == svpy_vq_should_interrupt(vq), "should_interrupt");
        break;
    case 8:
        if (vq->active)
            H_CHECK(svpy_vq_avail_idx(vq) == vq->avail->idx, "avail_idx");
        break;
    }
}

static void vq_end(void)
{
    for (unsigned q = 0; q < QUEUES; q++)
        svpy_vq_deactivate(&vqs[q]);
}

static const struct h_device device = {
    .num_queues = QUEUES,
    .num_ops = 9,
    .queue = vq_queue,
    .broken = &broken,
    .begin = vq_begin,
    .start = vq_start,
    .reset = vq_reset,
    .notify = vq_notify,
    .op = vq_op,
    .end = vq_end,
    .activated = vq_activated,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h_run(&device, data, size);
    return 0;
}
