/*
 * The rng action: asks the first virtio-rng device for random bytes and reports
 * what came back, how fast, and a checksum (so that a test with a known source
 * file can check the bytes themselves).
 *
 * Command-line keys (all optional):
 *   svtest.bytes=N      bytes to get in all (default 4096)
 *   svtest.chunk=N      bytes per request (default 64, at most 4096)
 *   svtest.inflight=N   requests posted at once (default 1, as Linux's driver does)
 *   svtest.queue_size=N, svtest.timeout_ms=N   as for the other drivers
 *
 * Lines:
 *   rng device=I base=.. irq=.. offered=.. accepted=.. queue-size=.. queue-num-max=..
 *   rng start bytes=N chunk=C inflight=K
 *   rng OK|FAIL[ why=..] got=N requests=R short=S empty=E zero-bytes=Z beyond=B
 *       sum=0x<fnv1a-64 of the bytes in answer order> first-us=.. us=.. ms=..
 *       tsc-khz=.. tsc-source=..
 * `beyond` counts bytes the device changed past the length it reported (must be 0);
 * `short` answers gave fewer bytes than asked (allowed: the rest is asked again).
 *
 * The rng-hostile action posts one bad request per case, each on a freshly
 * initialised device, then checks that a normal request is answered again:
 *   readonly  one device-readable buffer (nothing to fill)
 *   huge      one writable buffer of 1 MiB
 *   oob       one writable buffer beyond guest RAM
 * Lines: `rng-hostile case=<name> result=<ok|timeout|needs-reset|...> len=N changed=N`
 * (changed: bytes of a read-only buffer the device wrote) and then
 * `rng-hostile recovered result=<...> len=N`.
 */
#include "actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"
#include "virtio_rng.h"

#define MAX_CHUNK (RNG_BUFFER_BYTES / VQ_MAX_SIZE)
#define MAX_EMPTY_IN_A_ROW 64
#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

struct rng_run {
    uint64_t want, got, outstanding, posted;
    uint64_t requests, shorts, empty, empty_in_a_row, zero_bytes, beyond, sum;
    uint64_t start, first;
    uint32_t slot_of[VQ_MAX_SIZE], asked_of[VQ_MAX_SIZE];
};

static uint64_t us_since(uint64_t start)
{
    return (rdtsc() - start) * 1000 / tsc_khz();
}

static void report_result(const struct rng_run *run, const char *why)
{
    uint64_t us = run->start ? us_since(run->start) : 0;
    report("rng %s%s got=%lu requests=%lu short=%lu empty=%lu zero-bytes=%lu beyond=%lu "
           "sum=0x%016lx first-us=%lu us=%lu ms=%lu tsc-khz=%lu tsc-source=%s",
           why ? "FAIL why=" : "OK", why ? why : "", run->got, run->requests, run->shorts,
           run->empty, run->zero_bytes, run->beyond, run->sum,
           run->first ? (run->first - run->start) * 1000 / tsc_khz() : 0, us, us / 1000,
           tsc_khz(), tsc_khz_source());
}

/* Takes in one answer: the checksum, the zero count, and what lies past its length. */
static void take_answer(struct rng_run *run, const uint8_t *slot, uint32_t asked, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++) {
        run->sum = (run->sum ^ slot[i]) * FNV_PRIME;
        run->zero_bytes += slot[i] == 0;
    }
    for (uint32_t i = len; i < asked; i++)
        run->beyond += slot[i] != 0;
    run->got += len;
    run->requests++;
    run->shorts += len < asked;
    if (len == 0) {
        run->empty++;
        run->empty_in_a_row++;
    } else {
        run->empty_in_a_row = 0;
    }
}

void action_rng(void)
{
    static struct rng_dev dev;
    static struct rng_run run;
    const char *cl = boot_info.cmdline;
    uint64_t chunk = cmdline_get_u64(cl, "svtest.chunk", 64);
    uint64_t inflight = cmdline_get_u64(cl, "svtest.inflight", 1);
    uint16_t queue_size = (uint16_t)cmdline_get_u64(cl, "svtest.queue_size", RNG_QUEUE_SIZE);
    unsigned timeout_ms = (unsigned)cmdline_get_u64(cl, "svtest.timeout_ms", 5000);
    uint8_t *buffer = rng_buffer();

    memset(&run, 0, sizeof(run));
    run.want = cmdline_get_u64(cl, "svtest.bytes", 4096);
    run.sum = FNV_OFFSET;
    if (chunk == 0 || chunk > MAX_CHUNK)
        chunk = chunk ? MAX_CHUNK : 1;

    unsigned count = 0;
    int index = rng_find(&count);
    if (index < 0) {
        report("rng FAIL init=no-device rngs=%u", count);
        finish();
    }
    const char *why = rng_init(&dev, &virtio_devs[index], queue_size, timeout_ms);
    if (why) {
        report("rng FAIL init=%s device=%d", why, index);
        finish();
    }
    if (inflight == 0 || inflight > dev.vq.size)
        inflight = inflight ? dev.vq.size : 1;
    report("rng device=%u base=0x%lx irq=%u offered=0x%016lx accepted=0x%016lx queue-size=%u "
           "queue-num-max=%u", dev.mmio->index, (uint64_t)dev.mmio->base, dev.mmio->irq,
           dev.offered, dev.accepted, dev.vq.size, dev.num_max);
    report("rng start bytes=%lu chunk=%lu inflight=%lu", run.want, chunk, inflight);

    uint64_t slots = RNG_BUFFER_BYTES / chunk, in_flight = 0;
    run.start = rdtsc();
    while (run.got < run.want) {
        while (in_flight < inflight && run.got + run.outstanding < run.want) {
            uint64_t left = run.want - run.got - run.outstanding;
            uint32_t asked = (uint32_t)(left < chunk ? left : chunk);
            uint32_t offset = (uint32_t)((run.posted % slots) * chunk);
            memset(buffer + offset, 0, asked);
            int head = rng_request(&dev, (uint64_t)(uintptr_t)(buffer + offset), asked);
            if (head < 0) {
                report_result(&run, rng_result_name(head));
                finish();
            }
            run.slot_of[head] = offset;
            run.asked_of[head] = asked;
            run.outstanding += asked;
            run.posted++;
            in_flight++;
        }
        uint32_t id, len;
        int ret = rng_wait_used(&dev, &id, &len);
        if (ret) {
            report_result(&run, rng_result_name(ret));
            finish();
        }
        if (!run.first)
            run.first = rdtsc();
        if (len > run.asked_of[id]) {
            report_result(&run, "len-beyond-buffer");
            finish();
        }
        in_flight--;
        run.outstanding -= run.asked_of[id];
        take_answer(&run, buffer + run.slot_of[id], run.asked_of[id], len);
        if (run.empty_in_a_row >= MAX_EMPTY_IN_A_ROW) {
            report_result(&run, "empty-answers");
            finish();
        }
    }
    report_result(&run, NULL);
    finish();
}

/* ---------------------------------------------------------------- rng-hostile */

#define HOSTILE_HUGE (1u << 20)

static void hostile_init(struct rng_dev *dev, int index, const char *step)
{
    const char *why = rng_init(dev, &virtio_devs[index], RNG_QUEUE_SIZE, 2000);
    if (why) {
        report("rng-hostile FAIL init=%s step=%s", why, step);
        finish();
    }
}

void action_rng_hostile(void)
{
    static struct rng_dev dev;
    static const char *const cases[] = { "readonly", "huge", "oob" };
    uint8_t *buffer = rng_buffer();
    unsigned count = 0;
    int index = rng_find(&count);
    if (index < 0) {
        report("rng-hostile FAIL init=no-device rngs=%u", count);
        finish();
    }
    for (unsigned c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        hostile_init(&dev, index, cases[c]);
        struct vq_buf buf = { .addr = (uint64_t)(uintptr_t)buffer, .len = 64, .write = false };
        if (c == 0)
            memset(buffer, 0x5a, 64);
        if (c == 1) {
            /* The .noinit buffer is 256 KiB; the rest of the MiB is the guest's free RAM. */
            buf.len = HOSTILE_HUGE;
            buf.write = true;
        }
        if (c == 2) {
            buf.addr = guest_ram_top_below_4g() + (64u << 20);
            buf.write = true;
        }
        int head = vq_add(&dev.vq, &buf, 1, NULL);
        vq_publish(&dev.vq, (uint16_t)head);
        vm_notify(dev.mmio, 0);
        uint32_t id = 0, len = 0, changed = 0;
        int ret = rng_wait_used(&dev, &id, &len);
        if (c == 0)
            for (unsigned i = 0; i < 64; i++)
                changed += buffer[i] != 0x5a;
        report("rng-hostile case=%s result=%s len=%u changed=%u", cases[c],
               rng_result_name(ret), ret ? 0 : len, changed);
    }
    hostile_init(&dev, index, "recovery");
    memset(buffer, 0, 64);
    int head = rng_request(&dev, (uint64_t)(uintptr_t)buffer, 64);
    uint32_t id = 0, len = 0;
    int ret = head < 0 ? head : rng_wait_used(&dev, &id, &len);
    report("rng-hostile recovered result=%s len=%u", rng_result_name(ret), ret ? 0 : len);
    finish();
}
