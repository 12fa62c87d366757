/* Guest RAM as seen by the data plane: a few (guest address, size, host
 * address) regions, and the one way to turn a guest range into a host
 * pointer.  Every guest-supplied address goes through svpy_translate, which
 * refuses ranges that are not wholly inside one region (overflow included). */
#ifndef SVPY_GUEST_MEMORY_H
#define SVPY_GUEST_MEMORY_H

#include <stddef.h>
#include <stdint.h>

#define SVPY_MAX_MEM_REGIONS 4

struct svpy_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *hva;
};

struct svpy_guest_memory {
    uint32_t count;
    struct svpy_mem_region regions[SVPY_MAX_MEM_REGIONS];
};

static inline void *svpy_translate(const struct svpy_guest_memory *mem, uint64_t gpa,
                                   uint64_t len)
{
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct svpy_mem_region *r = &mem->regions[i];

        /* Written to avoid overflow: gpa - r->gpa cannot wrap once gpa >= r->gpa. */
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

#endif
