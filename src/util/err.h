/* The error convention: library functions write one line into a caller-owned
 * buffer (err, errlen; err may be NULL) and return -1. */
#ifndef CAKE_ERR_H
#define CAKE_ERR_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

__attribute__((format(printf, 3, 4))) static inline int cake_err(char *err, size_t errlen,
                                                                 const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

#endif
