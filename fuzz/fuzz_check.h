/* The fuzz targets' invariant check: a failure prints the condition and
 * aborts, which libFuzzer reports as a crash and keeps the input of. */
#ifndef CAKE_FUZZ_CHECK_H
#define CAKE_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "invariant failed: %s (line %d)\n", #c, __LINE__);                     \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
