/* Disk data patterns (formulas in blk_pattern.h). */
#include "blk_pattern.h"

#include <stdbool.h>

#include "guestmem.h"

#define SECTOR 512
#define WORDS_PER_SECTOR (SECTOR / 8)

/* Words 1..63 of a sector of the tagged pattern depend on the tag only: made once per tag. */
static uint64_t tag_template[WORDS_PER_SECTOR] NOINIT;
static unsigned template_tag = ~0u;

uint64_t pattern_tagged_word(uint64_t sector, unsigned tag, unsigned j)
{
    uint64_t v = (uint64_t)tag << 56;
    v |= j == 0 ? (sector & 0xffffffffffffull) << 8 : ((uint64_t)j << 40) | ((uint64_t)j << 8);
    return v ^ 0x5a5a5a5a5a5a5a5aull;
}

void pattern_fill_tagged(void *buf, uint64_t sector, uint32_t sectors, unsigned tag)
{
    if (template_tag != tag) {
        for (unsigned j = 0; j < WORDS_PER_SECTOR; j++)
            tag_template[j] = pattern_tagged_word(0, tag, j);
        template_tag = tag;
    }
    /* A copy (rep movsq) per sector, then its first word: 5x cheaper than computing each word. */
    uint64_t *w = buf;
    for (uint32_t k = 0; k < sectors; k++, w += WORDS_PER_SECTOR) {
        mem_copy(w, tag_template, SECTOR);
        w[0] = pattern_tagged_word(sector + k, tag, 0);
    }
}

/*
 * Sector s of the host pattern is bytes c, c+1, ... (mod 256) with
 * c = (x*131 + s*7) mod 256: a 512-byte window into a table of 0..255 repeated.
 */
static uint8_t ramp[256 + SECTOR] NOINIT;
static bool ramp_ready;

static const uint8_t *host_sector(uint64_t sector, uint64_t seed)
{
    if (!ramp_ready) {
        for (unsigned i = 0; i < sizeof(ramp); i++)
            ramp[i] = (uint8_t)i;
        ramp_ready = true;
    }
    return ramp + (uint8_t)(seed * 131 + sector * 7);
}

void pattern_fill_host(void *buf, uint64_t sector, uint32_t sectors, uint64_t seed)
{
    uint8_t *p = buf;
    for (uint32_t k = 0; k < sectors; k++)
        mem_copy(p + (size_t)k * SECTOR, host_sector(sector + k, seed), SECTOR);
}

size_t pattern_check_host(const void *buf, uint64_t sector, uint32_t sectors, uint64_t seed)
{
    const uint8_t *p = buf;
    for (uint32_t k = 0; k < sectors; k++) {
        size_t off = mem_diff(p + (size_t)k * SECTOR, host_sector(sector + k, seed), SECTOR);
        if (off < SECTOR)
            return (size_t)k * SECTOR + off;
    }
    return (size_t)sectors * SECTOR;
}
