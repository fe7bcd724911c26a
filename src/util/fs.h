#ifndef CAKE_UTIL_FS_H
#define CAKE_UTIL_FS_H

/* mkdir -p: creates path and the folders above it (mode 0755). 0, or -1 with
 * errno set. */
int cake_mkdir_p(const char *path);

/* rm -rf without a shell: removes path and what is under it (symbolic links
 * as links, never followed). 0, or -1 with errno set (what it could remove
 * is gone). */
int cake_remove_tree(const char *path);

#endif
