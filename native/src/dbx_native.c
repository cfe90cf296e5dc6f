/* See dbx_native.h. Kept minimal: policy lives in Python. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* <sys/mount.h> and <linux/mount.h> clash on older glibc; declare the two
 * classic calls we need ourselves. */
extern int mount(const char *, const char *, const char *, unsigned long, const void *);
extern int umount2(const char *, int);

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

/* Mount an overlay with the new mount API, one lower layer per fsconfig call
 * ("lowerdir+", Linux >= 6.8): no page-size limit on the option string, so
 * chains of up to overlayfs' 500 layers mount. `lowers` are top first.
 * `opts` are "key=value" or "flag" strings. */
int dbx_mount_overlay(const char *target, const char *const *lowers, int nlowers,
                      const char *upper, const char *work, const char *const *opts,
                      int nopts, int rdonly)
{
    int err = 0, mfd = -1;
    int fs = (int)syscall(SYS_fsopen, "overlay", FSOPEN_CLOEXEC);
    if (fs < 0)
        return -errno;
#define CONFIG(cmd, key, value)                                               \
    do {                                                                      \
        if (syscall(SYS_fsconfig, fs, (cmd), (key), (value), 0) < 0) {        \
            err = -errno;                                                     \
            goto out;                                                         \
        }                                                                     \
    } while (0)
    for (int i = 0; i < nlowers; i++)
        CONFIG(FSCONFIG_SET_STRING, "lowerdir+", lowers[i]);
    if (upper) {
        CONFIG(FSCONFIG_SET_STRING, "upperdir", upper);
        CONFIG(FSCONFIG_SET_STRING, "workdir", work);
    }
    for (int i = 0; i < nopts; i++) {
        char key[64];
        const char *eq = strchr(opts[i], '=');
        if (!eq) {
            CONFIG(FSCONFIG_SET_FLAG, opts[i], NULL);
            continue;
        }
        size_t n = (size_t)(eq - opts[i]);
        if (n >= sizeof(key)) {
            err = -EINVAL;
            goto out;
        }
        memcpy(key, opts[i], n);
        key[n] = '\0';
        CONFIG(FSCONFIG_SET_STRING, key, eq + 1);
    }
    CONFIG(FSCONFIG_CMD_CREATE, NULL, NULL);
#undef CONFIG
    mfd = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC, rdonly ? MOUNT_ATTR_RDONLY : 0);
    if (mfd < 0) {
        err = -errno;
        goto out;
    }
    if (syscall(SYS_move_mount, mfd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        err = -errno;
out:
    if (mfd >= 0)
        close(mfd);
    close(fs);
    return err;
}
