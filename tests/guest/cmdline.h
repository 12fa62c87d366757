/*
 * Kernel-style command line: tokens separated by blanks, "key=value" or "flag".
 * No quoting.  When a key repeats, the last occurrence wins (as for Linux
 * module parameters).
 */
#ifndef SVTEST_CMDLINE_H
#define SVTEST_CMDLINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cmdline_token {
    const char *text; /* the whole token, not NUL-terminated */
    size_t len;
    const char *key; /* == text */
    size_t key_len;
    const char *value; /* after '=', or NULL for a flag */
    size_t value_len;
};

/*
 * Token iteration: start with *pos = cmdline; returns false at the end.
 *     const char *pos = cmdline; struct cmdline_token t;
 *     while (cmdline_next(&pos, &t)) ...
 */
bool cmdline_next(const char **pos, struct cmdline_token *token);

/* Finds the value of key (last occurrence). A flag without '=' has value "". */
bool cmdline_find(const char *cmdline, const char *key, const char **value, size_t *value_len);

/* Copies the value of key into buf (NUL-terminated); returns false when absent. */
bool cmdline_get_str(const char *cmdline, const char *key, char *buf, size_t size);

/* Value of key parsed with parse_size() (0x.., decimal, K/M/G), or fallback. */
uint64_t cmdline_get_u64(const char *cmdline, const char *key, uint64_t fallback);

#endif
