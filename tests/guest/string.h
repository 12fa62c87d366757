/* Freestanding string and number helpers. */
#ifndef SVTEST_STRING_H
#define SVTEST_STRING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* gcc may emit calls to these four even in freestanding code. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);

/* Copies at most size-1 bytes and always NUL-terminates (size > 0). */
size_t strlcpy(char *dst, const char *src, size_t size);

/* True when the n bytes at s equal the NUL-terminated word. */
bool str_equals_n(const char *s, size_t n, const char *word);
bool str_starts_with(const char *s, const char *prefix);

/*
 * Parses an unsigned number at s (stopping at end, or at NUL when end is NULL):
 * "0x"/"0X" prefix for hexadecimal, decimal otherwise.  Returns the address after
 * the last digit, or NULL when there is no digit or the value overflows.
 */
const char *parse_u64(const char *s, const char *end, uint64_t *out);

/*
 * Like parse_u64, then an optional K/M/G suffix (binary multiples), as in
 * Linux's memparse() used for virtio_mmio.device=<size>@<base>:<irq>.
 */
const char *parse_size(const char *s, const char *end, uint64_t *out);

#endif
