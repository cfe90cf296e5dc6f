"""cffi build script for ``deltabox._native`` (API mode, compiled C).

Declarations live here, the C lives in native/src. Run through native/build.py
(or setup.py); never imported at runtime.
"""

from pathlib import Path

import cffi

SRC = Path(__file__).resolve().parent / "src"

ffibuilder = cffi.FFI()
ffibuilder.cdef(
    """
    #define NATIVE_ABI_VERSION ...
    int dbx_mount(const char *source, const char *target, const char *fstype,
                  unsigned long flags, const char *data);
    int dbx_umount2(const char *target, int flags);
    int dbx_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                    uint64_t resolve);
    int dbx_mount_overlay(const char *target, const char *const *lowers, int nlowers,
                          const char *upper, const char *work, const char *const *opts,
                          int nopts, int rdonly);
    int dbx_clone_entry(int upper_fd, int layer_fd, const char *rel, uint32_t mode,
                        uint64_t rdev, uint64_t size, uint32_t uid, uint32_t gid,
                        int64_t atime_ns, int64_t mtime_ns);
    int dbx_copy_meta(int upper_fd, int layer_fd, const char *rel, uint32_t mode,
                      uint32_t uid, uint32_t gid, int64_t atime_ns, int64_t mtime_ns,
                      int keep_opaque);
    struct dbx_dev_rule {
        char type;
        int32_t major;
        int32_t minor;
        uint32_t access;
    };
    int dbx_load_device_filter(const struct dbx_dev_rule *rules, int nrules, char *log,
                               uint32_t log_size);
    int dbx_attach_device_filter(int cgroup_fd, int prog_fd);
    """
)
ffibuilder.set_source(
    "deltabox._native",
    '#include "dbx_native.h"\n#define NATIVE_ABI_VERSION 5\n',
    sources=[str(SRC / "dbx_native.c")],
    include_dirs=[str(SRC)],
    extra_compile_args=["-O2", "-Wall", "-Werror"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
