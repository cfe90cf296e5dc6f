/* See dbx_native.h. Kept minimal: policy lives in Python. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
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
    /* nosuid: a setuid file made inside a sandbox must not run as root for a host
     * user who reaches the branch; nodev: device nodes in an image stay inert. */
    mfd = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC,
                       MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (rdonly ? MOUNT_ATTR_RDONLY : 0));
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

/* ---- DeltaFS sink: recreate one upper entry in a layer ---------------------
 *
 * The Python sink decides *what* to copy (deltabox/deltafs.py); these calls do
 * the per-entry syscalls, which in Python cost ~100 us per file. */

#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <linux/fs.h>

#define OVL_PREFIX "trusted.overlay."
#define OVL_OPAQUE "trusted.overlay.opaque"

/* Copy xattrs of upper/rel to layer/rel (both through /proc/self/fd paths so
 * that symlinks are not followed: l*xattr on the path of the entry itself). */
/* The xattr names of `path` in a malloc'ed buffer (*len bytes), or NULL. */
static char *list_xattrs(const char *path, ssize_t *len)
{
    for (;;) {
        ssize_t need = llistxattr(path, NULL, 0);
        if (need <= 0) {
            *len = need;
            return NULL;
        }
        char *names = malloc((size_t)need);
        if (!names) {
            errno = ENOMEM;
            *len = -1;
            return NULL;
        }
        *len = llistxattr(path, names, (size_t)need);
        if (*len >= 0 || errno != ERANGE)
            return names;
        free(names); /* grew meanwhile: ask again */
    }
}

/* Copy xattrs of upper/rel to layer/rel, through /proc/self/fd paths (l*xattr:
 * a symlink's own). Buffers are sized from the kernel's answers, so any number
 * of xattrs and values up to XATTR_SIZE_MAX work. */
static int copy_xattrs(int upper_fd, int layer_fd, const char *rel, int keep_opaque,
                       int is_link)
{
    char src[PATH_MAX + 64], dst[PATH_MAX + 64];
    if ((size_t)snprintf(src, sizeof src, "/proc/self/fd/%d/%s", upper_fd, rel) >= sizeof src ||
        (size_t)snprintf(dst, sizeof dst, "/proc/self/fd/%d/%s", layer_fd, rel) >= sizeof dst)
        return -ENAMETOOLONG;
    ssize_t len;
    char *names = list_xattrs(src, &len);
    if (len < 0)
        return (errno == ENOTSUP) ? 0 : -errno;
    int err = 0;
    char *value = NULL;
    for (char *name = names; name && name < names + len; name += strlen(name) + 1) {
        if (strncmp(name, OVL_PREFIX, strlen(OVL_PREFIX)) == 0 &&
            !(keep_opaque && strcmp(name, OVL_OPAQUE) == 0))
            continue;
        if (is_link && strncmp(name, "user.", 5) == 0)
            continue;
        ssize_t vlen = lgetxattr(src, name, NULL, 0);
        if (vlen < 0) {
            err = -errno;
            break;
        }
        free(value);
        value = malloc((size_t)vlen + 1);
        if (!value) {
            err = -ENOMEM;
            break;
        }
        vlen = lgetxattr(src, name, value, (size_t)vlen);
        if (vlen < 0 || lsetxattr(dst, name, value, (size_t)vlen, 0) < 0) {
            err = -errno;
            break;
        }
    }
    free(value);
    free(names);
    return err;
}

/* A timespec from nanoseconds since the epoch, negative ones included. */
static struct timespec ts_from_ns(int64_t ns)
{
    int64_t sec = ns / 1000000000, nsec = ns % 1000000000;
    if (nsec < 0) {
        nsec += 1000000000;
        sec -= 1;
    }
    return (struct timespec){.tv_sec = sec, .tv_nsec = nsec};
}

/* Set owner, mode, xattrs and times of layer/rel from `st` (the upper's). */
int dbx_copy_meta(int upper_fd, int layer_fd, const char *rel, uint32_t mode, uint32_t uid,
                  uint32_t gid, int64_t atime_ns, int64_t mtime_ns, int keep_opaque)
{
    int is_link = S_ISLNK(mode);
    if (fchownat(layer_fd, rel, uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
        return -errno;
    if (!is_link && fchmodat(layer_fd, rel, mode & 07777, 0) < 0)
        return -errno;
    int err = copy_xattrs(upper_fd, layer_fd, rel, keep_opaque, is_link);
    if (err)
        return err;
    struct timespec ts[2] = {ts_from_ns(atime_ns), ts_from_ns(mtime_ns)};
    if (utimensat(layer_fd, rel, ts, AT_SYMLINK_NOFOLLOW) < 0)
        return -errno;
    return 0;
}

/* Recreate the non-directory upper/rel as layer/rel: regular files by reflink
 * (FICLONE: shared extents, no data copied), symlinks, and device nodes /
 * whiteouts / fifos / sockets by mknod; then its metadata. */
int dbx_clone_entry(int upper_fd, int layer_fd, const char *rel, uint32_t mode, uint64_t rdev,
                    uint64_t size, uint32_t uid, uint32_t gid, int64_t atime_ns,
                    int64_t mtime_ns)
{
    if (S_ISREG(mode)) {
        int src = openat(upper_fd, rel, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (src < 0)
            return -errno;
        int dst = openat(layer_fd, rel, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (dst < 0) {
            int e = -errno;
            close(src);
            return e;
        }
        int rc = (size && ioctl(dst, FICLONE, src) < 0) ? -errno : 0;
        close(src);
        close(dst);
        if (rc)
            return rc;
    } else if (S_ISLNK(mode)) {
        char target[PATH_MAX];
        ssize_t n = readlinkat(upper_fd, rel, target, sizeof target - 1);
        if (n < 0)
            return -errno;
        target[n] = '\0';
        if (symlinkat(target, layer_fd, rel) < 0)
            return -errno;
    } else if (mknodat(layer_fd, rel, mode, (dev_t)rdev) < 0) {
        return -errno;
    }
    return dbx_copy_meta(upper_fd, layer_fd, rel, mode, uid, gid, atime_ns, mtime_ns, 0);
}

/* ---- Device allow-list for cgroup v2 ---------------------------------------
 *
 * cgroup v2 has no devices.allow: the kernel asks a BPF_PROG_TYPE_CGROUP_DEVICE
 * program attached to the task's cgroup (as runc and crun do). The rule table
 * (deltabox/cgroups.py DEVICE_ALLOW) becomes straight-line code: one block per
 * rule that returns 1 (allow) when every field matches and otherwise jumps to
 * the next block; past the last one, 0 (deny: the open or mknod gets EPERM). */

#include <stddef.h>
#include <linux/bpf.h>

#define DBX_MAX_DEV_RULES 256
#define DEVCG_ACC_ALL (BPF_DEVCG_ACC_MKNOD | BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE)

static struct bpf_insn insn(uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm)
{
    return (struct bpf_insn){.code = code, .dst_reg = dst, .src_reg = src, .off = off, .imm = imm};
}

/* The program for `rules`, in a malloc'ed array of *count instructions. */
static int build_device_filter(const struct dbx_dev_rule *rules, int nrules,
                               struct bpf_insn **out, int *count)
{
    if (nrules < 0 || nrules > DBX_MAX_DEV_RULES)
        return -EINVAL;
    /* 6 instructions of prologue, at most 8 per rule, 2 of epilogue. */
    struct bpf_insn *p = calloc((size_t)(6 + 8 * nrules + 2), sizeof *p);
    if (!p)
        return -ENOMEM;
    int n = 0;
    /* struct bpf_cgroup_dev_ctx { u32 access_type = (access << 16) | type; u32 major, minor; }
     * r2 = type, r3 = access, r4 = major, r5 = minor (32-bit ops zero-extend). */
    p[n++] = insn(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_2, BPF_REG_1,
                  offsetof(struct bpf_cgroup_dev_ctx, access_type), 0);
    p[n++] = insn(BPF_ALU | BPF_MOV | BPF_X, BPF_REG_3, BPF_REG_2, 0, 0);
    p[n++] = insn(BPF_ALU | BPF_AND | BPF_K, BPF_REG_2, 0, 0, 0xffff);
    p[n++] = insn(BPF_ALU | BPF_RSH | BPF_K, BPF_REG_3, 0, 0, 16);
    p[n++] = insn(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_4, BPF_REG_1,
                  offsetof(struct bpf_cgroup_dev_ctx, major), 0);
    p[n++] = insn(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_5, BPF_REG_1,
                  offsetof(struct bpf_cgroup_dev_ctx, minor), 0);
    for (int i = 0; i < nrules; i++) {
        const struct dbx_dev_rule *r = &rules[i];
        int type = r->type == 'c' ? BPF_DEVCG_DEV_CHAR : r->type == 'b' ? BPF_DEVCG_DEV_BLOCK
                 : r->type == 'a' ? 0 : -1;
        if (type < 0 || r->access == 0 || (r->access & ~(uint32_t)DEVCG_ACC_ALL) ||
            r->major < -1 || r->minor < -1) {
            free(p);
            return -EINVAL;
        }
        int check_access = r->access != DEVCG_ACC_ALL;
        int next = n + (type != 0) + 3 * check_access + (r->major >= 0) + (r->minor >= 0) + 2;
#define JNE_NEXT(reg, value) \
        (p[n] = insn(BPF_JMP | BPF_JNE | BPF_K, (reg), 0, (int16_t)(next - n - 1), (value)), n++)
        if (type != 0)
            JNE_NEXT(BPF_REG_2, type);
        if (check_access) { /* every requested bit must be allowed: access & ~allowed == 0 */
            p[n++] = insn(BPF_ALU | BPF_MOV | BPF_X, BPF_REG_1, BPF_REG_3, 0, 0);
            p[n++] = insn(BPF_ALU | BPF_AND | BPF_K, BPF_REG_1, 0, 0,
                          (int32_t)(~r->access & DEVCG_ACC_ALL));
            JNE_NEXT(BPF_REG_1, 0);
        }
        if (r->major >= 0)
            JNE_NEXT(BPF_REG_4, r->major);
        if (r->minor >= 0)
            JNE_NEXT(BPF_REG_5, r->minor);
#undef JNE_NEXT
        p[n++] = insn(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 1);
        p[n++] = insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
    }
    p[n++] = insn(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 0);
    p[n++] = insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
    *out = p;
    *count = n;
    return 0;
}

int dbx_load_device_filter(const struct dbx_dev_rule *rules, int nrules, char *log,
                           uint32_t log_size)
{
    struct bpf_insn *prog;
    int count, err = build_device_filter(rules, nrules, &prog, &count);
    if (err)
        return err;
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_CGROUP_DEVICE;
    attr.expected_attach_type = BPF_CGROUP_DEVICE;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = (uint32_t)count;
    attr.license = (uint64_t)(uintptr_t)"Apache-2.0";
    int fd = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr); /* O_CLOEXEC */
    err = fd < 0 ? -errno : 0;
    if (fd < 0 && log && log_size) { /* again, for the verifier's reason */
        log[0] = '\0';
        attr.log_level = 1;
        attr.log_buf = (uint64_t)(uintptr_t)log;
        attr.log_size = log_size;
        fd = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr);
        if (fd >= 0) /* loaded after all */
            err = 0;
    }
    free(prog);
    return fd >= 0 ? fd : err;
}

int dbx_attach_device_filter(int cgroup_fd, int prog_fd)
{
    /* No flags: one program per cgroup, attaching again replaces it (a cgroup set
     * up again keeps exactly one filter), and no sub-cgroup may attach its own. */
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.target_fd = (uint32_t)cgroup_fd;
    attr.attach_bpf_fd = (uint32_t)prog_fd;
    attr.attach_type = BPF_CGROUP_DEVICE;
    return syscall(SYS_bpf, BPF_PROG_ATTACH, &attr, sizeof attr) == 0 ? 0 : -errno;
}
