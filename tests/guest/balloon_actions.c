/*
 * The balloon action: gives pages of a touched region to the device and takes
 * them back as the device's target (num_pages) moves, keeps a statistics
 * buffer on the stats queue, and optionally reports free memory.
 *
 * Command-line keys (all optional):
 *   svtest.touch_mb=N          MiB of RAM touched and offered to the balloon (default 32)
 *   svtest.report_mb=N         MiB more touched, then reported free (REPORTING; default 0)
 *   svtest.report_delay_ms=N   wait between touching and reporting (default 0)
 *   svtest.rounds=N            end after N target changes were handled (default 0: never)
 *   svtest.watch_ms=N          end after N ms (default 0: never)
 *   svtest.poll_ms=N           how often the config and queues are polled (default 10)
 *   svtest.stats, svtest.deflate_on_oom, svtest.reporting, svtest.must_tell_host (0|1, default 1)
 *   svtest.queue_size=N, svtest.timeout_ms=N   as for the other drivers
 * The byte 'q' on the UART ends it too.
 */
#include "balloon_actions.h"

#include "actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "printf.h"
#include "serial.h"
#include "string.h"
#include "tsc.h"

#define MiB (1ul << 20)
#define REGION_ALIGN (2 * MiB)
#define IDENTITY_LIMIT (1ull << 32)
#define PATTERN_KEY 0x5356424c4f4f4e21ull /* "SVBLOON!" */

extern char __image_end[];

uint64_t balloon_ram_end(void)
{
    uint64_t end = 0;
    for (unsigned i = 0; i < boot_info_regions_kept(); i++) {
        const struct mem_region *r = &boot_info.regions[i];
        if (r->type == E820_RAM && r->addr + r->size > end)
            end = r->addr + r->size;
    }
    return end;
}

uint64_t balloon_region(uint64_t bytes, const char **why)
{
    uint64_t base = ((uintptr_t)__image_end + REGION_ALIGN - 1) & ~(REGION_ALIGN - 1);
    if (bytes > IDENTITY_LIMIT || base + bytes > IDENTITY_LIMIT) {
        *why = "beyond-identity-map";
        return 0;
    }
    for (unsigned i = 0; i < boot_info_regions_kept(); i++) {
        const struct mem_region *r = &boot_info.regions[i];
        if (r->type == E820_RAM && r->addr <= base && base + bytes <= r->addr + r->size)
            return base;
    }
    *why = "not-in-ram";
    return 0;
}

/* The three words of a page: offsets 0, 8..4080 (varies with the page), 4088. */
static inline unsigned mid_offset(uint64_t page)
{
    return 8u + (unsigned)(((page >> BALLOON_PAGE_SHIFT) * 8u) % 4080u);
}

static inline uint64_t pattern_word(uint64_t addr, uint64_t gen)
{
    return addr ^ (gen * 0x9e3779b97f4a7c15ull) ^ PATTERN_KEY;
}

void balloon_pattern_write(uint64_t base, uint64_t pages, uint64_t gen)
{
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t page = base + p * BALLOON_PAGE_SIZE;
        uint64_t offs[3] = { 0, mid_offset(page), BALLOON_PAGE_SIZE - 8 };
        for (unsigned i = 0; i < 3; i++)
            *(volatile uint64_t *)(page + offs[i]) = pattern_word(page + offs[i], gen);
    }
}

struct balloon_pattern_result balloon_pattern_check(uint64_t base, uint64_t pages, uint64_t gen)
{
    struct balloon_pattern_result r = { 0, 0, 0 };
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t page = base + p * BALLOON_PAGE_SIZE;
        uint64_t offs[3] = { 0, mid_offset(page), BALLOON_PAGE_SIZE - 8 };
        bool bad = false;
        for (unsigned i = 0; i < 3; i++) {
            if (*(volatile uint64_t *)(page + offs[i]) != pattern_word(page + offs[i], gen)) {
                if (!r.first_bad)
                    r.first_bad = page + offs[i];
                bad = true;
            }
        }
        r.bad += bad;
    }
    return r;
}

uint64_t balloon_pattern_zeroed(uint64_t base, uint64_t pages)
{
    uint64_t zeroed = 0;
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t page = base + p * BALLOON_PAGE_SIZE;
        zeroed += *(volatile uint64_t *)page == 0 &&
                  *(volatile uint64_t *)(page + mid_offset(page)) == 0 &&
                  *(volatile uint64_t *)(page + BALLOON_PAGE_SIZE - 8) == 0;
    }
    return zeroed;
}

void balloon_open_or_finish(struct balloon_dev *b, const char *action,
                            const struct balloon_options *opts)
{
    unsigned count = 0;
    int index = balloon_find(0, &count);
    if (index < 0) {
        report("%s FAIL init=no-device balloons=%u", action, count);
        finish();
    }
    const char *why = balloon_init(b, &virtio_devs[index], opts);
    if (why) {
        report("%s FAIL init=%s device=%d", action, why, index);
        finish();
    }
}

void balloon_report_device(const struct balloon_dev *b, const char *action)
{
    report("%s device=%u base=0x%lx irq=%u offered=0x%016lx accepted=0x%016lx stats=%d "
           "reporting=%d deflate-on-oom=%d queue-size=%u queue-num-max=%u stats-queue=%d "
           "report-queue=%d ram-end=0x%lx",
           action, b->mmio->index, (uint64_t)b->mmio->base, b->mmio->irq, b->offered,
           b->accepted, b->has_stats, b->has_reporting,
           (int)!!(b->accepted & VIRTIO_BIT(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)), b->inflate.size,
           b->num_max[0], b->stats_index, b->report_index, balloon_ram_end());
}

/* ---------------------------------------------------------------- balloon */

struct balloon_run {
    struct balloon_dev dev;
    uint64_t base, pages;     /* the touched region offered to the balloon */
    uint64_t inflated;        /* pages base.. base + inflated are in the balloon */
    uint64_t report_base, report_pages;
    uint64_t last_target;
    unsigned rounds;
};

/*
 * Values the guest knows: the RAM e820 gave it, and as free what neither the image
 * nor the region (in use or in the balloon, both taken) holds.  MAJFLT counts the
 * rounds handled and MINFLT the buffer's number (0 first), so the host sees fresh
 * statistics arrive.
 */
static unsigned fill_stats(const struct balloon_run *r, struct balloon_stat *s)
{
    uint64_t ram = boot_info_ram_bytes();
    uint64_t taken = (uintptr_t)__image_end + (r->pages + r->report_pages) * BALLOON_PAGE_SIZE;
    uint64_t free = ram > taken ? ram - taken : 0;
    unsigned i = 0;
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_SWAP_IN, 0 };
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_SWAP_OUT, 0 };
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_MAJFLT, r->rounds };
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_MINFLT,
                                    r->dev.stats_posts };
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_MEMFREE, free };
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_MEMTOT, ram };
    s[i++] = (struct balloon_stat){ VIRTIO_BALLOON_S_AVAIL, free };
    return i;
}

static void post_stats(struct balloon_run *r)
{
    if (!r->dev.has_stats || r->dev.stats_posted)
        return;
    struct balloon_stat s[BALLOON_MAX_STATS];
    unsigned n = fill_stats(r, s);
    int err = balloon_post_stats(&r->dev, s, n);
    if (err)
        report("balloon FAIL op=stats result=%s", balloon_result_name(err));
}

NORETURN static void fail(const char *op, int err)
{
    report("balloon FAIL op=%s result=%s", op, balloon_result_name(err));
    finish();
}

static void inflate_to(struct balloon_run *r, uint64_t want)
{
    uint64_t start = rdtsc(), first = r->inflated, n = want - first;
    int err = balloon_give_pfns(&r->dev, BALLOON_INFLATEQ,
                                (r->base >> BALLOON_PAGE_SHIFT) + first, n);
    if (err)
        fail("inflate", err);
    r->inflated = want;
    balloon_set_actual(&r->dev, (uint32_t)want);
    report("balloon actual=%lu inflated=%lu ms=%lu", want, n, tsc_elapsed_ms(start));
    /* What stays with the guest must be untouched by the device. */
    uint64_t rest = r->pages - want;
    struct balloon_pattern_result c =
        balloon_pattern_check(r->base + want * BALLOON_PAGE_SIZE, rest, BALLOON_GEN_TOUCH);
    report("balloon intact pages=%lu bad=%lu first-bad=0x%lx", rest, c.bad, c.first_bad);
}

static void deflate_to(struct balloon_run *r, uint64_t want)
{
    uint64_t start = rdtsc(), n = r->inflated - want;
    uint64_t addr = r->base + want * BALLOON_PAGE_SIZE;
    /* Told before use (MUST_TELL_HOST or not): the pages are used only after this. */
    int err = balloon_give_pfns(&r->dev, BALLOON_DEFLATEQ, addr >> BALLOON_PAGE_SHIFT, n);
    if (err)
        fail("deflate", err);
    r->inflated = want;
    balloon_set_actual(&r->dev, (uint32_t)want);
    report("balloon actual=%lu deflated=%lu ms=%lu", want, n, tsc_elapsed_ms(start));
    /* The pages came back: usable (written, read back) and, if released, zero. */
    uint64_t zeroed = balloon_pattern_zeroed(addr, n);
    uint64_t gen = 2 + r->rounds;
    balloon_pattern_write(addr, n, gen);
    struct balloon_pattern_result c = balloon_pattern_check(addr, n, gen);
    report("balloon deflate-verify pages=%lu zeroed=%lu bad=%lu first-bad=0x%lx", n, zeroed,
           c.bad, c.first_bad);
    /* Back to the touched pattern, so the whole non-inflated region checks alike. */
    balloon_pattern_write(addr, n, BALLOON_GEN_TOUCH);
}

static void follow_target(struct balloon_run *r)
{
    uint64_t target = balloon_target(&r->dev);
    uint64_t want = target < r->pages ? target : r->pages;
    if (target != r->last_target) {
        report("balloon target=%lu actual=%lu", target, r->inflated);
        if (target > r->pages)
            report("balloon capped target=%lu max=%lu", target, r->pages);
        r->last_target = target;
    }
    if (want == r->inflated)
        return;
    if (want > r->inflated)
        inflate_to(r, want);
    else
        deflate_to(r, want);
    r->rounds++;
}

static void report_free_memory(struct balloon_run *r, uint64_t delay_ms)
{
    if (!r->report_pages)
        return;
    if (!r->dev.has_reporting) {
        report("balloon report skip reason=reporting-not-negotiated");
        return;
    }
    if (delay_ms)
        tsc_delay_us(delay_ms * 1000);
    uint64_t start = rdtsc();
    int chains = balloon_report_free(&r->dev, r->report_base, r->report_pages * BALLOON_PAGE_SIZE);
    if (chains < 0)
        fail("report", chains);
    report("balloon reported mb=%lu chains=%d ms=%lu", r->report_pages * BALLOON_PAGE_SIZE / MiB,
           chains, tsc_elapsed_ms(start));
}

/* After reporting, the memory is the guest's again: it reads zero (if released) and works. */
static void reuse_reported(struct balloon_run *r)
{
    if (!r->report_pages || !r->dev.has_reporting)
        return;
    uint64_t zeroed = balloon_pattern_zeroed(r->report_base, r->report_pages);
    balloon_pattern_write(r->report_base, r->report_pages, 7);
    struct balloon_pattern_result c = balloon_pattern_check(r->report_base, r->report_pages, 7);
    report("balloon report-reuse pages=%lu zeroed=%lu bad=%lu first-bad=0x%lx", r->report_pages,
           zeroed, c.bad, c.first_bad);
}

void action_balloon(void)
{
    static struct balloon_run run;
    struct balloon_run *r = &run;
    const char *cl = boot_info.cmdline;
    struct balloon_options opts;
    balloon_options_from_cmdline(&opts);
    uint64_t touch_mb = cmdline_get_u64(cl, "svtest.touch_mb", 32);
    uint64_t report_mb = cmdline_get_u64(cl, "svtest.report_mb", 0);
    uint64_t report_delay = cmdline_get_u64(cl, "svtest.report_delay_ms", 0);
    uint64_t rounds = cmdline_get_u64(cl, "svtest.rounds", 0);
    uint64_t watch_ms = cmdline_get_u64(cl, "svtest.watch_ms", 0);
    uint64_t poll_ms = cmdline_get_u64(cl, "svtest.poll_ms", 10);

    balloon_open_or_finish(&r->dev, "balloon", &opts);
    balloon_report_device(&r->dev, "balloon");

    const char *why = "";
    r->base = balloon_region((touch_mb + report_mb) * MiB, &why);
    if (!r->base) {
        report("balloon FAIL region=%s mb=%lu ram-top=0x%lx", why, touch_mb + report_mb,
               guest_ram_top_below_4g());
        finish();
    }
    r->pages = touch_mb * MiB / BALLOON_PAGE_SIZE;
    r->report_base = r->base + touch_mb * MiB;
    r->report_pages = report_mb * MiB / BALLOON_PAGE_SIZE;

    uint64_t start = rdtsc();
    balloon_pattern_write(r->base, r->pages + r->report_pages, BALLOON_GEN_TOUCH);
    report("balloon touched mb=%lu pages=%lu addr=0x%lx report-mb=%lu ms=%lu", touch_mb,
           r->pages, r->base, report_mb, tsc_elapsed_ms(start));
    report_free_memory(r, report_delay);

    post_stats(r);
    report("balloon ready pages=%lu target=%u actual=%u", r->pages, balloon_target(&r->dev),
           balloon_actual(&r->dev));

    uint64_t end = watch_ms ? tsc_deadline_ms(watch_ms) : 0;
    const char *why_end = "rounds";
    for (;;) {
        balloon_ack_interrupts(&r->dev);
        if (balloon_stats_returned(&r->dev)) {
            post_stats(r);
            report("balloon stats refill=%u", r->dev.stats_refills);
        }
        follow_target(r);
        if (rounds && r->rounds >= rounds)
            break;
        uint8_t key;
        if (serial_try_getc(&key) && key == 'q') {
            why_end = "quit";
            break;
        }
        if (end && tsc_passed(end)) {
            why_end = "watch-ms";
            break;
        }
        if (vm_status(r->dev.mmio) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
            fail("watch", BALLOON_ERR_BROKEN);
        tsc_delay_us(poll_ms * 1000);
    }
    reuse_reported(r);
    report("balloon done end=%s rounds=%u inflated=%lu deflated=%lu stats-refills=%u "
           "config-irqs=%u chains=%u kicks=%u",
           why_end, r->rounds, r->dev.pages_inflated, r->dev.pages_deflated,
           r->dev.stats_refills, r->dev.config_irqs, r->dev.chains, r->dev.kicks);
    finish();
}
