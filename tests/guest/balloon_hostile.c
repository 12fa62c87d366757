/*
 * balloon-hostile: page lists and descriptors a correct driver never sends, one
 * case at a time, then checks that the guest's own memory kept its contents and
 * that a normal inflate/deflate still works.
 *
 * The region (balloon_region) is laid out as:
 *   +0        1 MiB: the huge list's buffer
 *   +1 MiB    1 MiB: 256 sacrificial pages, the only valid frames the cases name
 *   +2 MiB    svtest.touch_mb MiB (default 8) of touched pages no case names
 * Keys: svtest.hostile=<case>|all, svtest.hostile_ms=N (wait for each case, default
 * 500), svtest.hostile_end=reset|halt, svtest.touch_mb=N, and the driver's keys.
 */
#include "actions.h"
#include "balloon_actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "platform.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"

#define MiB (1ul << 20)
#define HUGE_LIST_BYTES MiB
#define SACRIFICIAL_PAGES 256u
#define UNMAPPED_GAP_ADDR 0xd0000000ull
#define LAPIC_PFN 0xfee00u
#define IOAPIC_PFN 0xfec00u
#define GAP_START_PFN 0xc0000u

struct hostile {
    struct balloon_dev dev;
    struct balloon_options opts;
    char only[32];
    unsigned wait_ms;
    uint64_t base, sacrificial, touched, touched_pages;
    uint64_t ram_end;
    unsigned cases, recovered, unrecovered;
};

/* Small PFN lists, one per case so nothing is rewritten while a device may read it. */
static uint32_t lists[16][8] __attribute__((aligned(64)));

static uint32_t sac_pfn(const struct hostile *h, unsigned i)
{
    return (uint32_t)((h->sacrificial >> BALLOON_PAGE_SHIFT) + i);
}

static bool reinit(struct hostile *h)
{
    const char *why = balloon_init(&h->dev, h->dev.mmio, &h->opts);
    if (why)
        report("balloon-hostile reinit FAIL init=%s", why);
    return why == NULL;
}

static void run_case(struct hostile *h, const char *name, unsigned q, const struct vq_buf *bufs,
                     unsigned n)
{
    if (strcmp(h->only, "all") != 0 && strcmp(h->only, name) != 0)
        return;
    h->cases++;
    int head = balloon_submit(&h->dev, q, bufs, n);
    if (head < 0) {
        report("balloon-hostile %s FAIL submit=%s", name, balloon_result_name(head));
        return;
    }
    uint32_t id = 0, len = 0;
    int err = balloon_wait_used(&h->dev, q, h->wait_ms, &id, &len);
    uint32_t status = vm_status(h->dev.mmio);
    uint32_t isr = balloon_ack_interrupts(&h->dev);
    report("balloon-hostile %s queue=%u used=%d used-len=%u result=%s status=0x%x needs-reset=%d "
           "isr=0x%x",
           name, q, err == 0, err == 0 ? len : 0, balloon_result_name(err), status,
           !!(status & VIRTIO_STATUS_DEVICE_NEEDS_RESET), isr);
    if (err == 0 && !(status & VIRTIO_STATUS_DEVICE_NEEDS_RESET))
        return;
    /* Not served, or the device gave up: start again from reset, as a driver would. */
    bool ok = reinit(h);
    h->recovered += ok;
    h->unrecovered += !ok;
    report("balloon-hostile %s recovered=%d", name, ok);
}

static struct vq_buf list_buf(unsigned slot, const uint32_t *pfns, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        lists[slot][i] = pfns[i];
    return (struct vq_buf){ (uintptr_t)lists[slot], n * 4u, false };
}

static void page_list_cases(struct hostile *h)
{
    uint32_t end_pfn = (uint32_t)(h->ram_end >> BALLOON_PAGE_SHIFT);
    uint32_t own_pfn = (uint32_t)(h->dev.mmio->base >> BALLOON_PAGE_SHIFT);
    struct vq_buf b[2];

    b[0] = list_buf(0, (const uint32_t[]){ 0xffffffffu }, 1);
    run_case(h, "pfn-ffffffff", BALLOON_INFLATEQ, b, 1);

    b[0] = list_buf(1, (const uint32_t[]){ end_pfn, end_pfn + 1 }, 2);
    run_case(h, "pfn-past-ram", BALLOON_INFLATEQ, b, 1);

    b[0] = list_buf(2, (const uint32_t[]){ GAP_START_PFN, own_pfn, IOAPIC_PFN, LAPIC_PFN }, 4);
    run_case(h, "pfn-mmio-gap", BALLOON_INFLATEQ, b, 1);

    b[0] = list_buf(3, (const uint32_t[]){ 0xffffffffu, end_pfn, own_pfn, LAPIC_PFN }, 4);
    run_case(h, "deflate-bad-pfns", BALLOON_DEFLATEQ, b, 1);

    b[0] = (struct vq_buf){ (uintptr_t)lists[4], 0, false };
    run_case(h, "empty-list", BALLOON_INFLATEQ, b, 1);

    /* Three frames in 12 bytes, cut after 6: the middle PFN straddles two descriptors. */
    struct vq_buf whole = list_buf(5, (const uint32_t[]){ sac_pfn(h, 0), sac_pfn(h, 1),
                                                          sac_pfn(h, 2) }, 3);
    b[0] = (struct vq_buf){ whole.addr, 6, false };
    b[1] = (struct vq_buf){ whole.addr + 6, 6, false };
    run_case(h, "split-pfn", BALLOON_INFLATEQ, b, 2);

    b[0] = list_buf(6, (const uint32_t[]){ sac_pfn(h, 3), 0xffffffffu }, 2);
    b[0].len = 6; /* one frame and half of another */
    run_case(h, "odd-length", BALLOON_INFLATEQ, b, 1);

    b[0] = list_buf(7, (const uint32_t[]){ sac_pfn(h, 4) }, 1);
    b[0].write = true;
    run_case(h, "device-writable", BALLOON_INFLATEQ, b, 1);

    /* The huge list: 256 valid frames, then 0xffffffff to the end of 1 MiB. */
    mem_fill((void *)(uintptr_t)h->base, 0xff, HUGE_LIST_BYTES);
    for (unsigned i = 0; i < SACRIFICIAL_PAGES; i++)
        ((uint32_t *)(uintptr_t)h->base)[i] = sac_pfn(h, i);
    b[0] = (struct vq_buf){ h->base, HUGE_LIST_BYTES, false };
    run_case(h, "huge-list", BALLOON_INFLATEQ, b, 1);
}

static void descriptor_cases(struct hostile *h)
{
    struct vq_buf b[1];
    b[0] = (struct vq_buf){ h->ram_end, 1024, false };
    run_case(h, "desc-beyond-ram", BALLOON_INFLATEQ, b, 1);
    b[0] = (struct vq_buf){ UNMAPPED_GAP_ADDR, 1024, false };
    run_case(h, "desc-in-mmio-gap", BALLOON_INFLATEQ, b, 1);
    b[0] = (struct vq_buf){ h->dev.mmio->base, 256, false };
    run_case(h, "desc-on-own-registers", BALLOON_INFLATEQ, b, 1);
    b[0] = (struct vq_buf){ 0xfffffffffffff000ull, 0x2000, false };
    run_case(h, "desc-addr-overflow", BALLOON_INFLATEQ, b, 1);
    b[0] = (struct vq_buf){ h->sacrificial, 0xfffff000u, false };
    run_case(h, "desc-huge-len", BALLOON_INFLATEQ, b, 1);
}

static void reporting_and_stats_cases(struct hostile *h)
{
    struct vq_buf b[1];
    if (h->dev.has_reporting) {
        unsigned q = (unsigned)h->dev.report_index;
        b[0] = (struct vq_buf){ h->ram_end, (uint32_t)MiB, true };
        run_case(h, "report-beyond-ram", q, b, 1);
        b[0] = (struct vq_buf){ h->sacrificial + 100, 4096, true };
        run_case(h, "report-unaligned", q, b, 1);
        b[0] = (struct vq_buf){ UNMAPPED_GAP_ADDR, (uint32_t)MiB, true };
        run_case(h, "report-mmio-gap", q, b, 1);
    }
    if (h->dev.has_stats) {
        /* One stat with an unknown tag and five stray bytes. */
        uint8_t *p = (uint8_t *)lists[8];
        mem_fill(p, 0x5a, 15);
        p[0] = 0xff;
        p[1] = 0xff;
        b[0] = (struct vq_buf){ (uintptr_t)p, 15, false };
        run_case(h, "stats-odd", (unsigned)h->dev.stats_index, b, 1);
    }
}

/* What no case named must still hold its pattern; a normal round trip must work. */
static void check_after(struct hostile *h)
{
    struct balloon_pattern_result t =
        balloon_pattern_check(h->touched, h->touched_pages, BALLOON_GEN_TOUCH);
    report("balloon-hostile touched pages=%lu bad=%lu first-bad=0x%lx", h->touched_pages, t.bad,
           t.first_bad);

    if (!reinit(h)) {
        report("balloon-hostile normal FAIL init");
        return;
    }
    uint64_t first = h->sacrificial >> BALLOON_PAGE_SHIFT;
    /* Whatever the cases put in the balloon comes back first. */
    int err = balloon_give_pfns(&h->dev, BALLOON_DEFLATEQ, first, SACRIFICIAL_PAGES);
    int inflate = err ? err : balloon_give_pfns(&h->dev, BALLOON_INFLATEQ, first,
                                                SACRIFICIAL_PAGES);
    if (!inflate)
        balloon_set_actual(&h->dev, SACRIFICIAL_PAGES);
    uint32_t actual = balloon_actual(&h->dev);
    int deflate = inflate ? inflate : balloon_give_pfns(&h->dev, BALLOON_DEFLATEQ, first,
                                                        SACRIFICIAL_PAGES);
    balloon_set_actual(&h->dev, 0);
    uint64_t zeroed = balloon_pattern_zeroed(h->sacrificial, SACRIFICIAL_PAGES);
    balloon_pattern_write(h->sacrificial, SACRIFICIAL_PAGES, 9);
    struct balloon_pattern_result v = balloon_pattern_check(h->sacrificial, SACRIFICIAL_PAGES, 9);
    report("balloon-hostile normal inflate=%s actual=%u deflate=%s pages=%u zeroed=%lu bad=%lu",
           balloon_result_name(inflate), actual, balloon_result_name(deflate), SACRIFICIAL_PAGES,
           zeroed, v.bad);
}

void action_balloon_hostile(void)
{
    static struct hostile hs;
    struct hostile *h = &hs;
    const char *cl = boot_info.cmdline;
    balloon_options_from_cmdline(&h->opts);
    mem_copy(h->only, "all", 4);
    cmdline_get_str(cl, "svtest.hostile", h->only, sizeof(h->only));
    h->wait_ms = (unsigned)cmdline_get_u64(cl, "svtest.hostile_ms", 500);
    char end[8] = "reset";
    cmdline_get_str(cl, "svtest.hostile_end", end, sizeof(end));
    uint64_t touch_mb = cmdline_get_u64(cl, "svtest.touch_mb", 8);

    balloon_open_or_finish(&h->dev, "balloon-hostile", &h->opts);
    balloon_report_device(&h->dev, "balloon-hostile");
    const char *why = "";
    h->base = balloon_region(2 * MiB + touch_mb * MiB, &why);
    if (!h->base) {
        report("balloon-hostile FAIL region=%s", why);
        finish();
    }
    h->sacrificial = h->base + HUGE_LIST_BYTES;
    h->touched = h->base + 2 * MiB;
    h->touched_pages = touch_mb * MiB / BALLOON_PAGE_SIZE;
    h->ram_end = balloon_ram_end();
    balloon_pattern_write(h->touched, h->touched_pages, BALLOON_GEN_TOUCH);
    report("balloon-hostile region=0x%lx sacrificial=0x%lx touched=0x%lx pages=%lu wait-ms=%u",
           h->base, h->sacrificial, h->touched, h->touched_pages, h->wait_ms);

    page_list_cases(h);
    descriptor_cases(h);
    reporting_and_stats_cases(h);
    check_after(h);
    report("balloon-hostile done cases=%u recovered=%u unrecovered=%u", h->cases, h->recovered,
           h->unrecovered);
    if (strcmp(end, "halt") == 0)
        platform_halt_forever();
    finish();
}
