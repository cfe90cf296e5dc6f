/* See dbx_native.h. Kept minimal: policy lives in Python. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/openat2.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "dbx_native.h"

int dbx_mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const char *data)
{
    return mount(source, target, fstype, flags, data) == 0 ? 0 : -errno;
}

int dbx_umount2(const char *target, int flags)
{
    return umount2(target, flags) == 0 ? 0 : -errno;
}

int dbx_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                uint64_t resolve)
{
    struct open_how how = {.flags = flags, .mode = mode, .resolve = resolve};
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    return fd >= 0 ? (int)fd : -errno;
}
