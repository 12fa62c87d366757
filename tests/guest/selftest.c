/*
 * svtest.action=selftest: checks the guest's own library (formatting, string and
 * command line helpers) inside the guest, prints "selftest=ok" or each failure.
 */
#include <stdint.h>

#include "actions.h"
#include "blk_pattern.h"
#include "cmdline.h"
#include "guestmem.h"
#include "printf.h"
#include "string.h"
#include "virtio_mmio.h"

static unsigned failures;

static void expect_str(const char *what, const char *got, const char *want)
{
    if (strcmp(got, want) != 0) {
        report("selftest-fail %s got=[%s] want=[%s]", what, got, want);
        failures++;
    }
}

static void expect_u64(const char *what, uint64_t got, uint64_t want)
{
    if (got != want) {
        report("selftest-fail %s got=0x%lx want=0x%lx", what, got, want);
        failures++;
    }
}

static void check_format(void)
{
    char buf[64];
    ksnprintf(buf, sizeof(buf), "%d %i %u", -42, 7, 4000000000u);
    expect_str("signed", buf, "-42 7 4000000000");
    ksnprintf(buf, sizeof(buf), "%x %X %lx %llx", 0xbeefu, 0xbeefu, 0x123456789abcdeful, 0ull);
    expect_str("hex", buf, "beef BEEF 123456789abcdef 0");
    ksnprintf(buf, sizeof(buf), "[%08x][%5d][%-5d][%05d]", 0xabu, 42, 42, -42);
    expect_str("width", buf, "[000000ab][   42][42   ][-0042]");
    ksnprintf(buf, sizeof(buf), "[%s][%6s][%-6s][%.3s][%.*s]", "ab", "ab", "ab", "abcdef", 2, "xyz");
    expect_str("strings", buf, "[ab][    ab][ab    ][abc][xy]");
    ksnprintf(buf, sizeof(buf), "%c%%%p", 'Z', (void *)0x1000);
    expect_str("misc", buf, "Z%0x1000");
    ksnprintf(buf, sizeof(buf), "%ld %lu", (long)INT64_MIN, UINT64_MAX);
    expect_str("limits", buf, "-9223372036854775808 18446744073709551615");
    int n = ksnprintf(buf, 4, "abcdef");
    expect_str("truncate", buf, "abc");
    expect_u64("truncate-length", (uint64_t)n, 6);
}

static void check_parsing(void)
{
    uint64_t v = 0;
    const char *s = "512@0xf0100000:5";
    const char *p = parse_size(s, NULL, &v);
    expect_u64("size", v, 512);
    expect_u64("size-end", p && *p == '@', 1);
    p = parse_u64(p + 1, NULL, &v);
    expect_u64("base", v, 0xf0100000u);
    p = parse_u64(p + 1, NULL, &v);
    expect_u64("irq", v, 5);
    expect_u64("irq-end", p && *p == '\0', 1);
    parse_size("4K", NULL, &v);
    expect_u64("4K", v, 4096);
    expect_u64("no-digit", parse_u64("x1", NULL, &v) == NULL, 1);
    expect_u64("overflow", parse_u64("0x10000000000000000", NULL, &v) == NULL, 1);

    const char *cl = " a=1  flag virtio_mmio.device=4K@0xd0000000:6 a=2\tb= ";
    char buf[32];
    expect_u64("find-a", cmdline_get_str(cl, "a", buf, sizeof(buf)), 1);
    expect_str("last-wins", buf, "2");
    expect_u64("find-flag", cmdline_get_str(cl, "flag", buf, sizeof(buf)), 1);
    expect_str("flag", buf, "");
    expect_u64("find-b", cmdline_get_str(cl, "b", buf, sizeof(buf)), 1);
    expect_str("empty", buf, "");
    expect_u64("absent", cmdline_get_str(cl, "c", buf, sizeof(buf)), 0);
    expect_u64("u64", cmdline_get_u64(cl, "a", 9), 2);
    expect_u64("u64-fallback", cmdline_get_u64(cl, "flag", 9), 9);

    unsigned tokens = 0;
    const char *pos = cl;
    struct cmdline_token t;
    while (cmdline_next(&pos, &t))
        tokens++;
    expect_u64("tokens", tokens, 5);
}

static void check_memory(void)
{
    char buf[16] = "0123456789";
    memmove(buf + 2, buf, 5);
    expect_str("memmove-up", buf, "0101234789");
    memmove(buf, buf + 2, 5);
    expect_str("memmove-down", buf, "0123434789");
    memset(buf + 3, 'x', 2);
    expect_str("memset", buf, "012xx34789");
    expect_u64("memcmp", memcmp("abc", "abd", 3) < 0, 1);
    expect_u64("strncmp", strncmp("abc", "abd", 2), 0);
    expect_u64("strlen", strlen(buf), 10);
}

static void check_virtio_token(void)
{
    struct virtio_mmio_dev d;
    expect_u64("token", virtio_mmio_parse_token("512@0xf0100200:6", 16, &d), 1);
    expect_u64("token-base", d.base, 0xf0100200u);
    expect_u64("token-size", d.size, 512);
    expect_u64("token-irq", d.irq, 6);
    expect_u64("token-k", virtio_mmio_parse_token("4K@0xd0000000:9:3", 17, &d), 1);
    expect_u64("token-k-size", d.size, 4096);
    expect_u64("token-no-irq", virtio_mmio_parse_token("512@0xf0100000", 14, &d), 0);
    expect_u64("token-trailing", virtio_mmio_parse_token("512@0xf0100000:5x", 17, &d), 0);
    expect_u64("token-above-4g", virtio_mmio_parse_token("512@0x100000000:5", 17, &d), 0);
    expect_u64("token-too-small", virtio_mmio_parse_token("16@0xf0100000:5", 15, &d), 0);
    const char *cl = "a virtio_mmio.device=512@0x1000:5 b=1 virtio_mmio.device=bad "
                     "virtio_mmio.device=1K@0x3000:7";
    struct virtio_mmio_dev devs[4];
    expect_u64("discover", virtio_mmio_discover(cl, devs, 4), 3);
    expect_u64("discover-0", devs[0].parsed && devs[0].base == 0x1000 && devs[0].irq == 5, 1);
    expect_u64("discover-1", devs[1].parsed, 0);
    expect_u64("discover-2", devs[2].parsed && devs[2].base == 0x3000 && devs[2].index == 2, 1);
}

static void check_bulk_memory(void)
{
    static uint8_t a[100], b[100];
    mem_fill(a, 0x5a, sizeof(a));
    mem_copy(b, a, sizeof(b));
    expect_u64("mem-equal", mem_diff(a, b, sizeof(a)), sizeof(a));
    const size_t where[] = { 0, 7, 8, 63, 95, 96, 99 };
    for (size_t i = 0; i < sizeof(where) / sizeof(where[0]); i++) {
        b[where[i]] ^= 1;
        expect_u64("mem-diff", mem_diff(a, b, sizeof(a)), where[i]);
        b[where[i]] ^= 1;
    }
    uint8_t sector[512];
    pattern_fill_host(sector, 3, 1, 5);
    expect_u64("host-pattern", sector[10], (5 * 131 + 3 * 7 + 10) & 0xff);
    expect_u64("host-check", pattern_check_host(sector, 3, 1, 5), 512);
    sector[300] ^= 0xff;
    expect_u64("host-mismatch", pattern_check_host(sector, 3, 1, 5), 300);
    pattern_fill_tagged(sector, 0x123456, 1, 7);
    const uint64_t x = 0x5a5a5a5a5a5a5a5aull;
    expect_u64("tagged-0", load64(sector), x ^ (7ull << 56 | 0x123456ull << 8));
    expect_u64("tagged-9", load64(sector + 72), x ^ (7ull << 56 | 9ull << 40 | 9ull << 8));
}

void action_selftest(void)
{
    check_format();
    check_parsing();
    check_memory();
    check_virtio_token();
    check_bulk_memory();
    if (failures)
        report("selftest=failed count=%u", failures);
    else
        report("selftest=ok");
    finish();
}
