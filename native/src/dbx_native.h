/* Raw Linux calls the daemon needs and Python's stdlib lacks.
 * Every function returns >= 0 on success and -errno on failure; the Python
 * wrapper (deltabox/_linux.py) turns negative values into OSError. */
#ifndef DBX_NATIVE_H
#define DBX_NATIVE_H
#include <stdint.h>

int dbx_mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const char *data);
int dbx_umount2(const char *target, int flags);
/* openat2(2) with how.resolve = resolve; returns an fd. */
int dbx_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                uint64_t resolve);
/* Overlay via fsopen/fsconfig("lowerdir+")/fsmount/move_mount; lowers top first. */
int dbx_mount_overlay(const char *target, const char *const *lowers, int nlowers,
                      const char *upper, const char *work, const char *const *opts,
                      int nopts, int rdonly);
/* DeltaFS sink: recreate a non-directory entry of an upper dir in a layer
 * (reflink for files), and copy metadata (owner, mode, xattrs, times). */
int dbx_clone_entry(int upper_fd, int layer_fd, const char *rel, uint32_t mode, uint64_t rdev,
                    uint64_t size, uint32_t uid, uint32_t gid, int64_t atime_ns,
                    int64_t mtime_ns);
int dbx_copy_meta(int upper_fd, int layer_fd, const char *rel, uint32_t mode, uint32_t uid,
                  uint32_t gid, int64_t atime_ns, int64_t mtime_ns, int keep_opaque);
/* A device allow-list rule: type 'c', 'b' or 'a' (both); major, minor or -1 for
 * any; access: a mask of BPF_DEVCG_ACC_MKNOD (1), _READ (2), _WRITE (4). */
struct dbx_dev_rule {
    char type;
    int32_t major;
    int32_t minor;
    uint32_t access;
};
/* Load a BPF_PROG_TYPE_CGROUP_DEVICE program that allows exactly `rules`
 * (anything else: EPERM); returns its fd (O_CLOEXEC). If the kernel refuses it
 * and `log` is given, the verifier's log is left there. */
int dbx_load_device_filter(const struct dbx_dev_rule *rules, int nrules, char *log,
                           uint32_t log_size);
/* Attach it to the cgroup v2 directory `cgroup_fd`, replacing the program
 * attached before; the attachment holds the program, prog_fd may be closed. */
int dbx_attach_device_filter(int cgroup_fd, int prog_fd);
#endif
