#ifndef CAKE_UTIL_FS_H
#define CAKE_UTIL_FS_H

/* mkdir -p: creates path and the folders above it (mode 0755). 0, or -1 with
 * errno set. */
int cake_mkdir_p(const char *path);

#endif
