/* Kernel-style command line parsing. */
#include "cmdline.h"

#include "string.h"

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

bool cmdline_next(const char **pos, struct cmdline_token *token)
{
    const char *p = *pos;
    while (*p && is_blank(*p))
        p++;
    if (!*p) {
        *pos = p;
        return false;
    }
    const char *start = p;
    while (*p && !is_blank(*p))
        p++;
    token->text = start;
    token->len = (size_t)(p - start);
    token->key = start;
    token->key_len = token->len;
    token->value = NULL;
    token->value_len = 0;
    for (const char *q = start; q < p; q++) {
        if (*q == '=') {
            token->key_len = (size_t)(q - start);
            token->value = q + 1;
            token->value_len = (size_t)(p - q - 1);
            break;
        }
    }
    *pos = p;
    return true;
}

bool cmdline_find(const char *cmdline, const char *key, const char **value, size_t *value_len)
{
    bool found = false;
    const char *pos = cmdline;
    struct cmdline_token t;
    while (cmdline_next(&pos, &t)) {
        if (!str_equals_n(t.key, t.key_len, key))
            continue;
        found = true;
        *value = t.value ? t.value : "";
        *value_len = t.value_len;
    }
    return found;
}

bool cmdline_get_str(const char *cmdline, const char *key, char *buf, size_t size)
{
    const char *value;
    size_t len;
    if (!cmdline_find(cmdline, key, &value, &len) || size == 0)
        return false;
    if (len > size - 1)
        len = size - 1;
    memcpy(buf, value, len);
    buf[len] = '\0';
    return true;
}

uint64_t cmdline_get_u64(const char *cmdline, const char *key, uint64_t fallback)
{
    const char *value;
    size_t len;
    uint64_t n;
    if (!cmdline_find(cmdline, key, &value, &len))
        return fallback;
    const char *end = parse_size(value, value + len, &n);
    return end == value + len ? n : fallback;
}
