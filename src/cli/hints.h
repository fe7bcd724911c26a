/* Hints kept across runs of `cake run` (the loader's compute speed, the
 * store's load rate), so that each run's first request starts from what the
 * last one measured. See hints.c. */
#ifndef CAKE_CLI_HINTS_H
#define CAKE_CLI_HINTS_H

#include "loader/loader.h"
#include "store/store.h"

/* The key of an engine's compute speed: its loader fingerprint (the model's,
 * made the backend's own where the KV bits differ), backend, threads and
 * chunk size. `cake run` and `cake serve` share it. */
void cli_hints_speed_key(char *out, size_t n, cake_context *engine, const char *backend,
                         long chunk);

/* Fills *speed from the hint under speed_key, and sets store's rate hint and
 * lookup time from those under rate_key (the store URI), where the file has
 * them. */
void cli_hints_load(const char *speed_key, cake_compute_speed *speed, const char *rate_key,
                    cake_store *store);

/* Records *speed under speed_key and store's rate hint and lookup time
 * (those it has) under rate_key, newest first. Failures are silent: hints
 * are optional. */
void cli_hints_save(const char *speed_key, const cake_compute_speed *speed, const char *rate_key,
                    const cake_store *store);

#endif
