/* UTF-8 validation, for output that must be valid UTF-8 (JSON). */
#ifndef CAKE_UTF8_H
#define CAKE_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* The length of the valid UTF-8 character at s[0..n) (s[0] >= 0x80; RFC
 * 3629: no overlong forms, no surrogates, at most U+10FFFF), or 0. */
static inline size_t utf8_char_len(const unsigned char *s, size_t n) {
    const unsigned c = s[0];
    const size_t len = c < 0xc2 ? 0 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf5 ? 4 : 0;
    if (len == 0 || len > n) return 0;
    uint32_t v = c & (0x7fu >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = v << 6 | (s[i] & 0x3fu);
    }
    const uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
    return len;
}

#endif
