/* Monotonic time in nanoseconds, and deadlines for the condition variables
 * that wait on CLOCK_MONOTONIC (pthread_condattr_setclock): one place for
 * the arithmetic that timespecs need. */
#ifndef CAKE_UTIL_CLOCK_H
#define CAKE_UTIL_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t cake_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline double cake_now_s(void) {
    return (double)cake_now_ns() / 1e9;
}

/* CLOCK_MONOTONIC time t (ns) as a timespec. */
static inline struct timespec cake_timespec_ns(uint64_t t) {
    return (struct timespec){(time_t)(t / 1000000000ull), (long)(t % 1000000000ull)};
}

/* The CLOCK_MONOTONIC time ns from now. */
static inline struct timespec cake_deadline_ns(uint64_t ns) {
    return cake_timespec_ns(cake_now_ns() + ns);
}

#endif
