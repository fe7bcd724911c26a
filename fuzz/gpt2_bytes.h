/* GPT-2's character for byte b as UTF-8 (byte-level BPE vocabularies write
 * their tokens in them): the printable Latin-1 bytes stand for themselves,
 * the other 68 for U+0100 upwards, in order. Written from the scheme, not
 * taken from tokenizer.c, so that the targets check its own. */
#ifndef CAKE_FUZZ_GPT2_BYTES_H
#define CAKE_FUZZ_GPT2_BYTES_H

#include <stdbool.h>

static inline void byte_char(int b, char out[3]) {
    int cp = b, extra = 0;
    for (int i = 0; i < 256; i++) {
        bool printable = (i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174;
        if (i == b && !printable) cp = 256 + extra;
        if (!printable) extra++;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = '\0';
    } else {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        out[2] = '\0';
    }
}

#endif
