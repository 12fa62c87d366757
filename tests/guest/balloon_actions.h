/*
 * What the balloon actions share: the RAM they own above the image, the page
 * pattern written into it, and opening the balloon device.
 *
 * The region starts at the first 2 MiB boundary above the image (__image_end)
 * and must lie in one e820 RAM range below 4 GiB (both entries identity-map
 * 0..4 GiB).  A page's pattern is three 64-bit words (offsets 0, a
 * page-dependent one, and 4088), each a function of its own address and a
 * generation number: writing one word per page is enough for the host to back
 * the page, and checking three per page costs about 15 us on the emulating host.
 */
#ifndef SVTEST_BALLOON_ACTIONS_H
#define SVTEST_BALLOON_ACTIONS_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_balloon.h"

#define BALLOON_GEN_TOUCH 1 /* the pattern of touched pages not in the balloon */

struct balloon_pattern_result {
    uint64_t bad;       /* pages with a wrong word */
    uint64_t zeroed;    /* pages whose three words read 0 (checked before writing) */
    uint64_t first_bad; /* address of the first wrong word, or 0 */
};

/*
 * The base of `bytes` of RAM the action may use, or 0 with *why set (no RAM range
 * holds it).
 */
uint64_t balloon_region(uint64_t bytes, const char **why);

/* The end of the highest e820 RAM range (any address). */
uint64_t balloon_ram_end(void);

void balloon_pattern_write(uint64_t base, uint64_t pages, uint64_t gen);
struct balloon_pattern_result balloon_pattern_check(uint64_t base, uint64_t pages, uint64_t gen);
/* Pages whose three pattern words are all zero. */
uint64_t balloon_pattern_zeroed(uint64_t base, uint64_t pages);

/*
 * Discovers the devices and initialises the first balloon into b.  On failure
 * prints "svtest: <action> FAIL init=<why> ..." and ends the run (done + reset).
 */
void balloon_open_or_finish(struct balloon_dev *b, const char *action,
                            const struct balloon_options *opts);

/* Prints "<action> device=<index> base=.. irq=.. offered=.. accepted=.. ..." */
void balloon_report_device(const struct balloon_dev *b, const char *action);

#endif
