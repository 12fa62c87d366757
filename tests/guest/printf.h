/*
 * printf-like formatting.
 *
 * Conversions: %s %c %d %i %u %x %X %p %%; length modifiers h (ignored), l, ll, z;
 * flags '-' and '0'; a width and, for %s, a precision ("%.*s" prints a slice).
 */
#ifndef SVTEST_PRINTF_H
#define SVTEST_PRINTF_H

#include <stdarg.h>
#include <stddef.h>

#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))

/* Formats to the serial port. Returns the number of characters written. */
int kprintf(const char *fmt, ...) PRINTF_LIKE(1, 2);
int kvprintf(const char *fmt, va_list ap);

/* Formats into buf (always NUL-terminated when size > 0); returns the full length. */
int ksnprintf(char *buf, size_t size, const char *fmt, ...) PRINTF_LIKE(3, 4);
int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/*
 * One machine-readable fact: prints "svtest: " + formatted text + "\n".
 * The monitor's tests match these lines.
 */
void report(const char *fmt, ...) PRINTF_LIKE(1, 2);

#endif
