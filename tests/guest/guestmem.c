/* Bulk memory helpers built on string instructions, and guest RAM queries. */
#include "guestmem.h"

#include "bootinfo.h"

void mem_copy(void *dst, const void *src, size_t n)
{
    size_t qwords = n / 8, tail = n % 8;
    __asm__ __volatile__("rep movsq\n\t"
                         "movq %3, %%rcx\n\t"
                         "rep movsb"
                         : "+D"(dst), "+S"(src), "+c"(qwords)
                         : "r"(tail)
                         : "memory");
}

void mem_fill(void *dst, uint8_t byte, size_t n)
{
    uint64_t pattern = 0x0101010101010101ull * byte;
    size_t qwords = n / 8, tail = n % 8;
    __asm__ __volatile__("rep stosq\n\t"
                         "movq %3, %%rcx\n\t"
                         "rep stosb"
                         : "+D"(dst), "+c"(qwords)
                         : "a"(pattern), "r"(tail)
                         : "memory");
}

size_t mem_diff(const void *a, const void *b, size_t n)
{
    const uint8_t *pa = a, *pb = b;
    size_t qwords = n / 8;
    size_t done = 0;
    if (qwords) {
        const void *sa = pa, *sb = pb;
        size_t left = qwords;
        /* repe cmpsq stops after the first unequal pair (which is consumed). */
        __asm__ __volatile__("repe cmpsq"
                             : "+S"(sa), "+D"(sb), "+c"(left)
                             :
                             : "memory", "cc");
        done = (size_t)((const uint8_t *)sa - pa);
        if (load64(pa + done - 8) != load64(pb + done - 8))
            done -= 8; /* the last compared pair differed: find the byte in it */
        else
            done = qwords * 8;
    }
    for (size_t i = done; i < n; i++) {
        if (pa[i] != pb[i])
            return i;
    }
    return n;
}

uint64_t guest_ram_top_below_4g(void)
{
    uint64_t top = 0;
    for (unsigned i = 0; i < boot_info_regions_kept(); i++) {
        const struct mem_region *r = &boot_info.regions[i];
        if (r->type != E820_RAM || r->addr >= (1ull << 32))
            continue;
        uint64_t end = r->addr + r->size;
        if (end > (1ull << 32))
            end = 1ull << 32;
        if (end > top)
            top = end;
    }
    return top;
}
