/* printf-like formatting onto the serial port or into a buffer. */
#include "printf.h"

#include <stdbool.h>
#include <stdint.h>

#include "serial.h"
#include "string.h"

struct sink {
    void (*put)(struct sink *sink, char c);
    char *buf;
    size_t size;
    size_t len; /* characters produced, written or not */
};

static void put_serial(struct sink *sink, char c)
{
    serial_putc(c);
    sink->len++;
}

static void put_buffer(struct sink *sink, char c)
{
    if (sink->len + 1 < sink->size)
        sink->buf[sink->len] = c;
    sink->len++;
}

static void put_padded(struct sink *sink, const char *s, size_t n, int width, bool left, char pad)
{
    size_t fill = width > 0 && (size_t)width > n ? (size_t)width - n : 0;
    if (!left)
        while (fill--)
            sink->put(sink, pad);
    for (size_t i = 0; i < n; i++)
        sink->put(sink, s[i]);
    if (left)
        while (fill--)
            sink->put(sink, ' ');
}

static void put_number(struct sink *sink, uint64_t value, bool negative, unsigned base, bool upper,
                       int width, bool left, bool zero)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    size_t n = 0;
    do {
        tmp[sizeof(tmp) - 1 - n++] = digits[value % base];
        value /= base;
    } while (value);
    if (negative && zero && !left) {
        /* Sign before the zero padding: "-0042". */
        sink->put(sink, '-');
        put_padded(sink, tmp + sizeof(tmp) - n, n, width - 1, false, '0');
        return;
    }
    if (negative)
        tmp[sizeof(tmp) - 1 - n++] = '-';
    put_padded(sink, tmp + sizeof(tmp) - n, n, width, left, zero && !left ? '0' : ' ');
}

static void format(struct sink *sink, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink->put(sink, *fmt);
            continue;
        }
        fmt++;
        bool left = false, zero = false;
        for (;; fmt++) {
            if (*fmt == '-')
                left = true;
            else if (*fmt == '0')
                zero = true;
            else
                break;
        }
        int width = 0;
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                left = true;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        int precision = -1;
        if (*fmt == '.') {
            fmt++;
            precision = 0;
            if (*fmt == '*') {
                precision = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    precision = precision * 10 + (*fmt++ - '0');
            }
        }
        int longs = 0;
        for (;; fmt++) {
            if (*fmt == 'l')
                longs++;
            else if (*fmt == 'z')
                longs = 2;
            else if (*fmt != 'h')
                break;
        }

        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            uint64_t mag = v < 0 ? -(uint64_t)v : (uint64_t)v;
            put_number(sink, mag, v < 0, 10, false, width, left, zero);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
            put_number(sink, v, false, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, left, zero);
            break;
        }
        case 'p':
            sink->put(sink, '0');
            sink->put(sink, 'x');
            put_number(sink, (uintptr_t)va_arg(ap, void *), false, 16, false, 0, false, false);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            size_t n = precision >= 0 ? strnlen(s, (size_t)precision) : strlen(s);
            put_padded(sink, s, n, width, left, ' ');
            break;
        }
        case 'c': {
            char c = (char)va_arg(ap, int);
            put_padded(sink, &c, 1, width, left, ' ');
            break;
        }
        case '%':
            sink->put(sink, '%');
            break;
        case '\0':
            return;
        default:
            /* Unknown conversion: print it as written. */
            sink->put(sink, '%');
            sink->put(sink, *fmt);
            break;
        }
    }
}

int kvprintf(const char *fmt, va_list ap)
{
    struct sink sink = { .put = put_serial };
    format(&sink, fmt, ap);
    return (int)sink.len;
}

int kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvprintf(fmt, ap);
    va_end(ap);
    return n;
}

int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink sink = { .put = put_buffer, .buf = buf, .size = size };
    format(&sink, fmt, ap);
    if (size)
        buf[sink.len < size ? sink.len : size - 1] = '\0';
    return (int)sink.len;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

void report(const char *fmt, ...)
{
    va_list ap;
    serial_puts("svtest: ");
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
    serial_putc('\n');
}
