/*
 * deltabox-init — the launcher of a DeltaBox sandbox and its pid 1.
 *
 * Launcher mode (the main mode on the command line):
 *
 *   deltabox-init --rootfs DIR --hostname NAME [--cgroup-procs FILE]...
 *                 [--memory-merge yes]
 *
 * joins the given cgroups, unshares mnt/uts/ipc/net/pid namespaces and forks
 * the sandbox's pid 1, which builds /proc and /dev inside DIR, pivots into it,
 * drops capabilities, re-executes itself from a copy at /.deltabox/deltabox-init
 * and then serves the control socket /dev/.deltabox/init.sock.  The launcher
 * prints pid 1's host pid once the socket is listening and exits; see
 * docs/init-protocol.md for the protocol.
 *
 * Everything here is shaped by one constraint: CRIU must be able to dump the
 * whole pid namespace while the daemon is NOT connected.  So pid 1 keeps no
 * fd from the host, maps no file from the host, no connection outlives a
 * request conversation, and all state lives in this process (a listening
 * socket, a signalfd, pipes/ptys).
 *
 * With --memory-merge yes the whole tree is marked for KSM (PR_SET_MEMORY_MERGE: the
 * mark is inherited across fork and kept across execve), so identical pages of a
 * sandbox and its body doubles can be merged by ksmd.  The one other mode,
 *
 *   deltabox-init --exec-memory-merged PROG [ARG]...
 *
 * sets the same mark and executes PROG: the daemon starts `criu swrk` this way, so the
 * trees CRIU restores (forked from criu) carry the mark too.
 *
 * Build: gcc -std=c11 -O2 -static -Wall -Wextra -Werror (see Makefile).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/fs.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/sendfile.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define INIT_VERSION      "deltabox-init 1"
#define SOCK_DIR          "/dev/.deltabox"
#define SOCK_PATH         SOCK_DIR "/init.sock"
#define DEFAULT_PATH      "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#define FRAME_HDR         5u            /* type byte + u32 LE length */
#define MAX_PAYLOAD       (1u << 20)    /* bigger frame = protocol error */
#define OUT_LIMIT         (1u << 20)    /* conn backlog that pauses child reads */
#define STDIN_LIMIT       (1u << 20)    /* pending stdin that pauses client reads */
#define DETACHED_LIMIT    (1u << 20)    /* per-stream output kept while detached */
#define DRAIN_LIMIT       (1u << 20)    /* last read pass when EOF never comes */
#define EOF_GRACE_MS      100           /* wait for pipe EOF after the exit */
#define READ_CHUNK        65536
#define MAX_SESSION_NAME  255
#define IDLE_BUF_CAP      65536         /* free emptied buffers bigger than this */
#define MAX_COMMAND       255           /* a kept process's command line, for listings */
#define MAX_KEPT_EXITED   32            /* exited kept processes remembered */
#define MAX_LINGERING     128           /* ended conversations whose pipes are drained */

/* ------------------------------------------------------------------ utils */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void put_u32le(unsigned char *p, uint32_t v)
{
    p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; p[2] = (v >> 16) & 0xff; p[3] = v >> 24;
}

static uint32_t get_u32le(const unsigned char *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get_u16le(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

/* pid 1 has nowhere to report an allocation failure; dying takes the
 * sandbox down cleanly, which beats limping on with lost output. */
static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q)
        abort();
    return q;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (!d)
        abort();
    return d;
}

/* ---------------------------------------------------------------- struct buf
 * A byte queue: valid bytes are data[off, off+len). */

struct buf {
    char *data;
    size_t off, len, cap;
};

static void buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

static void buf_append(struct buf *b, const void *p, size_t n)
{
    if (b->off + b->len + n > b->cap) {
        if (b->off) {
            memmove(b->data, b->data + b->off, b->len);
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 4096;
            while (cap < b->len + n)
                cap *= 2;
            b->data = xrealloc(b->data, cap);
            b->cap = cap;
        }
    }
    memcpy(b->data + b->off + b->len, p, n);
    b->len += n;
}

static void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    b->len -= n;
    if (b->len == 0) {
        b->off = 0;
        /* Keep pid 1 small: its memory is in every CRIU dump. */
        if (b->cap > IDLE_BUF_CAP)
            buf_free(b);
    }
}

/* Append, dropping the oldest bytes so that at most `limit` remain. */
static void buf_append_bounded(struct buf *b, const char *p, size_t n, size_t limit)
{
    if (n >= limit) {
        b->off = b->len = 0;
        p += n - limit;
        n = limit;
    } else if (b->len + n > limit) {
        buf_consume(b, b->len + n - limit);
    }
    buf_append(b, p, n);
}

/* ------------------------------------------------------- struct proc / conn */

struct conn;

/* A process started by SPAWN, with the pipes or pty that init relays. */
struct proc {
    struct proc *next;
    pid_t pid;              /* pid inside the sandbox; also its pgid and sid */
    int pty;                /* 1: in_fd == out_fd == the pty master */
    int in_fd;              /* stdin pipe write end or pty master; -1 once closed */
    int out_fd;             /* stdout pipe read end or pty master */
    int err_fd;             /* stderr pipe read end; -1 with a pty */
    int out_eof, err_eof;
    struct buf stdin_buf;   /* client stdin the child has not taken yet */
    int stdin_eof;          /* 'i' received: close stdin once stdin_buf drains */
    int stdin_broken;       /* the child's stdin is gone: drop further input */
    char *session;          /* persistent session name, or NULL */
    struct conn *conn;      /* attached connection, or NULL (detached session) */
    struct buf held_out, held_err;  /* output kept while detached (kept: the tail) */
    int keep;               /* a detached exec: the record outlives the process */
    char *command;          /* kept: argv joined by spaces, for listings */
    uint64_t out_total, err_total;  /* bytes the process wrote on each stream */
    int exited;
    int status;             /* raw wait status, valid once exited */
    int64_t exit_ms;
    int reported;           /* exited, output read (or grace over), 'E' sent if attached */
    int lingering;          /* conversation over; background processes still hold the
                               pipes: read and discard until they close them */
    int dead;               /* torn down; freed at the end of the loop turn */
};

/* A client connection: at most one process conversation. */
struct conn {
    struct conn *next;
    int fd;
    struct buf in, out;
    struct proc *proc;      /* the process this connection talks to, or NULL */
    int used;               /* SPAWN or ATTACH already seen */
    int closing;            /* close as soon as `out` is flushed */
    int dead;
};

static struct conn *conns;
static struct proc *procs;
static int listen_fd = -1;
static int sig_fd = -1;
static int accept_paused;   /* out of fds: stop accepting until a conn closes */

static void conn_send(struct conn *c, char type, const void *p, size_t n)
{
    unsigned char hdr[FRAME_HDR];

    if (c->closing || c->dead)
        return;
    hdr[0] = (unsigned char)type;
    put_u32le(hdr + 1, (uint32_t)n);
    buf_append(&c->out, hdr, sizeof hdr);
    if (n)
        buf_append(&c->out, p, n);
}

static void conn_send_u32(struct conn *c, char type, uint32_t v)
{
    unsigned char p[4];
    put_u32le(p, v);
    conn_send(c, type, p, sizeof p);
}

static void proc_destroy(struct proc *p);
static void proc_retire(struct proc *p);

/* The connection of a process went away (closed, failed, or finished).
 * Sessions and kept processes are merely detached.  A plain process still
 * running was cancelled: its group dies.  One that has exited (its 'E' not
 * sent yet) leaves its background processes alone, as after a normal end. */
static void proc_conn_gone(struct proc *p)
{
    p->conn = NULL;
    if (p->session)
        return;
    if (p->exited) {
        proc_retire(p);
    } else {
        kill(-p->pid, SIGKILL);
        proc_destroy(p);
    }
}

/* End the conversation: detach or kill the process now, close the socket
 * once everything queued has been sent. */
static void conn_end(struct conn *c)
{
    struct proc *p = c->proc;

    if (p) {
        c->proc = NULL;
        proc_conn_gone(p);
    }
    c->closing = 1;
}

static void conn_close(struct conn *c)
{
    if (c->dead)
        return;
    conn_end(c);
    close(c->fd);
    c->fd = -1;
    c->dead = 1;
    accept_paused = 0;
}

/* Send an 'F' frame "errno=<n> <what>: <message>" and end the conversation. */
static void conn_fail(struct conn *c, int err, const char *fmt, ...)
{
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "errno=%d ", err);
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    conn_send(c, 'F', msg, strlen(msg));
    conn_end(c);
}

/* Close the child's stdin (pipes; with a pty it is the master, closed with
 * the output). */
static void proc_close_stdin(struct proc *p)
{
    if (!p->pty && p->in_fd >= 0)
        close(p->in_fd);
    if (!p->pty)
        p->in_fd = -1;
    buf_free(&p->stdin_buf);
}

static void proc_close_output(struct proc *p)
{
    if (p->out_fd >= 0)
        close(p->out_fd);
    if (p->err_fd >= 0)
        close(p->err_fd);
    if (p->pty)
        p->in_fd = -1;
    p->out_fd = p->err_fd = -1;
    p->out_eof = p->err_eof = 1;
    accept_paused = 0;      /* fds were freed */
}

/* Free the record and its pipes.  It kills nothing: a process that is still
 * running was killed by the caller (cancel) or is meant to go on running. */
static void proc_destroy(struct proc *p)
{
    if (p->dead)
        return;
    p->dead = 1;
    if (p->conn) {
        p->conn->proc = NULL;
        p->conn = NULL;
    }
    proc_close_stdin(p);
    proc_close_output(p);
    buf_free(&p->held_out);
    buf_free(&p->held_err);
    free(p->session);
    free(p->command);
    p->session = p->command = NULL;
}

/* The conversation is over (the process exited and 'E' went out, or a kept
 * record was removed), but what it left running in the background may still
 * hold its stdout/stderr: keep reading them and throw the bytes away, so that
 * such a process never dies of SIGPIPE or blocks on a full pipe.  At most
 * MAX_LINGERING records linger (each holds two fds); beyond, the oldest one's
 * pipes are closed. */
static void proc_retire(struct proc *p)
{
    struct proc *oldest = NULL;
    int n = 0;

    if (p->dead || p->lingering)
        return;
    if (p->conn) {
        p->conn->proc = NULL;
        p->conn = NULL;
    }
    if (p->out_eof && (p->err_fd < 0 || p->err_eof)) {
        proc_destroy(p);
        return;
    }
    p->lingering = 1;
    proc_close_stdin(p);
    buf_free(&p->held_out);
    buf_free(&p->held_err);
    free(p->session);
    free(p->command);
    p->session = p->command = NULL;
    for (struct proc *q = procs; q; q = q->next)
        if (!q->dead && q->lingering) {
            n++;
            oldest = q;     /* procs is newest first */
        }
    if (n > MAX_LINGERING)
        proc_destroy(oldest);
}

static struct proc *find_session(const char *name)
{
    for (struct proc *p = procs; p; p = p->next)
        if (!p->dead && p->session && strcmp(p->session, name) == 0)
            return p;
    return NULL;
}

/* ------------------------------------------------------------ child output */

static void proc_deliver(struct proc *p, int is_err, const char *data, size_t n)
{
    if (p->lingering)
        return;
    *(is_err ? &p->err_total : &p->out_total) += n;
    if (p->conn)
        conn_send(p->conn, is_err ? 'R' : 'O', data, n);
    /* A kept process's log is its tail, attached or not. */
    if (!p->conn || p->keep)
        buf_append_bounded(is_err ? &p->held_err : &p->held_out, data, n, DETACHED_LIMIT);
}

/* One read from stdout or stderr.  Returns bytes read, 0 at EOF, -1 if it
 * would block. */
static ssize_t proc_read_once(struct proc *p, int is_err)
{
    static char chunk[READ_CHUNK];
    int fd = is_err ? p->err_fd : p->out_fd;
    ssize_t n = read(fd, chunk, sizeof chunk);

    if (n > 0) {
        proc_deliver(p, is_err, chunk, (size_t)n);
        return n;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return -1;
    /* 0, or EIO from a pty master whose slave side is all closed */
    if (is_err)
        p->err_eof = 1;
    else
        p->out_eof = 1;
    return 0;
}

static int proc_output_done(const struct proc *p)
{
    return p->out_eof && (p->err_fd < 0 || p->err_eof);
}

/* The leader exited but someone (a background grandchild) still holds the
 * pipes: take what is there now, ignoring backpressure, and stop. */
static void proc_drain(struct proc *p)
{
    for (int is_err = 0; is_err <= 1; is_err++) {
        size_t total = 0;
        if (is_err ? (p->err_fd < 0 || p->err_eof) : p->out_eof)
            continue;
        while (total < DRAIN_LIMIT) {
            ssize_t n = proc_read_once(p, is_err);
            if (n <= 0)
                break;
            total += (size_t)n;
        }
    }
}

/* Kept processes that have exited are remembered up to MAX_KEPT_EXITED; then
 * the one that ended first is forgotten. */
static void evict_kept(void)
{
    struct proc *oldest = NULL;
    int n = 0;

    for (struct proc *q = procs; q; q = q->next)
        if (!q->dead && q->keep && q->reported && !q->lingering) {
            n++;
            if (!oldest || q->exit_ms <= oldest->exit_ms)
                oldest = q;
        }
    if (n > MAX_KEPT_EXITED)
        proc_retire(oldest);
}

/* After the exit and the output: 'E' to the client.  Then a plain process or
 * a session is retired, leaving its background processes running; a kept
 * process stays listed with its status and output until removed. */
static void proc_check_done(struct proc *p, int64_t now)
{
    if (p->dead || !p->exited)
        return;
    if (p->lingering || p->reported) {
        /* only background writers left: close the pipes once they are done */
        if (proc_output_done(p) && p->out_fd >= 0) {
            if (p->lingering)
                proc_destroy(p);
            else
                proc_close_output(p);
        }
        return;
    }
    if (!proc_output_done(p)) {
        if (now < p->exit_ms + EOF_GRACE_MS)
            return;
        proc_drain(p);
    }
    p->reported = 1;
    if (p->conn) {
        struct conn *c = p->conn;
        conn_send_u32(c, 'E', (uint32_t)p->status);
        c->proc = NULL;
        p->conn = NULL;
        c->closing = 1;
    }
    if (p->keep) {
        proc_close_stdin(p);
        evict_kept();
    } else {
        proc_retire(p);
    }
}

/* ------------------------------------------------------------- child stdin */

static void proc_flush_stdin(struct proc *p)
{
    while (p->stdin_buf.len && p->in_fd >= 0) {
        ssize_t n = write(p->in_fd, p->stdin_buf.data + p->stdin_buf.off, p->stdin_buf.len);
        if (n > 0) {
            buf_consume(&p->stdin_buf, (size_t)n);
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            return;
        } else {
            /* EPIPE / EIO: nobody reads stdin any more; drop input */
            buf_free(&p->stdin_buf);
            p->stdin_broken = 1;
        }
    }
    if (!p->stdin_buf.len && p->stdin_eof && !p->pty && p->in_fd >= 0) {
        close(p->in_fd);
        p->in_fd = -1;
    }
}

/* ------------------------------------------------------------------- SPAWN */

struct spawn_req {
    char **argv;
    char **envp;
    const char *cwd;
    int use_pty;
    struct winsize ws;
    const char *session;
    int keep;
};

static char *default_env[] = {
    "PATH=" DEFAULT_PATH, "HOME=/root", "TERM=xterm", NULL,
};

/* Parse "K:value\0" records.  Pointers point into `payload`.  Returns NULL
 * or a message saying what is wrong. */
static const char *parse_spawn(char *payload, size_t n, struct spawn_req *r)
{
    size_t nrec = 0, argc = 0, envc = 0;

    memset(r, 0, sizeof *r);
    r->cwd = "/";
    r->ws.ws_row = 24;
    r->ws.ws_col = 80;
    if (n == 0 || payload[n - 1] != '\0')
        return "records must be NUL-terminated";
    for (size_t i = 0; i < n; i++)
        nrec += payload[i] == '\0';
    r->argv = xrealloc(NULL, (nrec + 1) * sizeof(char *));
    r->envp = xrealloc(NULL, (nrec + 1) * sizeof(char *));

    for (char *rec = payload; rec < payload + n; rec += strlen(rec) + 1) {
        char *val = rec + 2;
        if (strlen(rec) < 2 || rec[1] != ':')
            return "malformed record";
        switch (rec[0]) {
        case 'a': r->argv[argc++] = val; break;
        case 'e': r->envp[envc++] = val; break;
        case 'c': r->cwd = val; break;
        case 't': r->use_pty = strcmp(val, "1") == 0; break;
        case 'k': r->keep = strcmp(val, "1") == 0; break;
        case 'n':
            if (!*val || strlen(val) > MAX_SESSION_NAME)
                return "session name must be 1-255 bytes";
            r->session = val;
            break;
        case 'w': {
            unsigned rows, cols;
            char end;
            if (sscanf(val, "%ux%u%c", &rows, &cols, &end) != 2 || rows > 65535 || cols > 65535)
                return "bad window size";
            r->ws.ws_row = (unsigned short)rows;
            r->ws.ws_col = (unsigned short)cols;
            break;
        }
        default:
            return "unknown record key";
        }
    }
    if (argc == 0)
        return "no argv";
    if (r->keep && !r->session)
        return "a kept process needs a name (n:)";
    r->argv[argc] = NULL;
    r->envp[envc] = NULL;
    return NULL;
}

/* In the forked child: report "errno=<n> <step> <arg>: <strerror>" through
 * the CLOEXEC error pipe (EOF there means exec succeeded) and die. */
static _Noreturn void child_fail(int errpipe, const char *step, const char *arg)
{
    int e = errno;
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "errno=%d %s%s%s: %s", e, step,
                     arg ? " " : "", arg ? arg : "", strerror(e));
    if (n > (int)sizeof msg - 1)
        n = sizeof msg - 1;
    if (write(errpipe, msg, (size_t)n) < 0)
        _exit(127);
    _exit(127);
}

/* Best effort: a kernel without the file simply keeps the default. */
static void write_oom_score_adj(const char *value)
{
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, value, strlen(value)) < 0) { /* nothing to do */ }
        close(fd);
    }
}

static _Noreturn void child_exec(const struct spawn_req *r, const int fds[3], int errpipe)
{
    sigset_t none;

    /* Undo init's own signal setup: SIG_IGN and the blocked mask would
     * otherwise survive exec. */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < _NSIG; sig++)
        signal(sig, SIG_DFL);   /* EINVAL for KILL/STOP/internal ones: fine */

    if (setsid() < 0)
        child_fail(errpipe, "setsid", NULL);
    /* init shields itself from the OOM killer (-1000, inherited); children
     * go back to the default so that a memory hog is what gets killed. */
    write_oom_score_adj("0");
    if (r->use_pty && ioctl(fds[0], TIOCSCTTY, 0) < 0)
        child_fail(errpipe, "tiocsctty", NULL);
    for (int i = 0; i < 3; i++) {
        if (fds[i] == i) {
            if (fcntl(i, F_SETFD, 0) < 0)
                child_fail(errpipe, "dup2", NULL);
        } else if (dup2(fds[i], i) < 0) {
            child_fail(errpipe, "dup2", NULL);
        }
    }
    /* Everything else (the listening socket, other clients, other children's
     * pipes, the error pipe) goes at exec. */
    close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
    if (chdir(r->cwd) < 0)
        child_fail(errpipe, "chdir", r->cwd);
    /* execvp searches the PATH of `environ`, i.e. the env we pass. */
    environ = r->envp;
    execvp(r->argv[0], r->argv);
    child_fail(errpipe, "exec", r->argv[0]);
}

/* Open a pty pair; the master is non-blocking. */
static int open_pty(int *master, int *slave, const struct winsize *ws)
{
    int unlock = 0;

    *master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (*master < 0)
        return -1;
    if (ioctl(*master, TIOCSPTLCK, &unlock) < 0 ||
        (*slave = ioctl(*master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
        int e = errno;
        close(*master);
        errno = e;
        return -1;
    }
    ioctl(*master, TIOCSWINSZ, ws);
    return 0;
}

static void close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0) {
            close(fds[i]);
            fds[i] = -1;
        }
}

/* Fork and exec the request; on success the new proc is attached to `c`
 * and 'P' is queued; on failure 'F' is. */
static void spawn_proc(struct conn *c, const struct spawn_req *r)
{
    int errp[2], child_fds[3] = {-1, -1, -1}, mine[3] = {-1, -1, -1};
    int p_in[2] = {-1, -1}, p_out[2] = {-1, -1}, p_err[2] = {-1, -1};
    char msg[1024];
    ssize_t n;
    size_t got = 0;
    pid_t pid;

    if (pipe2(errp, O_CLOEXEC) < 0) {
        conn_fail(c, errno, "spawn pipe: %s", strerror(errno));
        return;
    }
    if (r->use_pty) {
        int master, slave;
        if (open_pty(&master, &slave, &r->ws) < 0) {
            conn_fail(c, errno, "spawn pty: %s", strerror(errno));
            close_fds(errp, 2);
            return;
        }
        child_fds[0] = child_fds[1] = child_fds[2] = slave;
        mine[0] = mine[1] = master;
    } else {
        if (pipe2(p_in, O_CLOEXEC) < 0 || pipe2(p_out, O_CLOEXEC) < 0 ||
            pipe2(p_err, O_CLOEXEC) < 0) {
            conn_fail(c, errno, "spawn pipe: %s", strerror(errno));
            close_fds(errp, 2); close_fds(p_in, 2); close_fds(p_out, 2); close_fds(p_err, 2);
            return;
        }
        child_fds[0] = p_in[0]; child_fds[1] = p_out[1]; child_fds[2] = p_err[1];
        mine[0] = p_in[1]; mine[1] = p_out[0]; mine[2] = p_err[0];
        for (int i = 0; i < 3; i++)
            fcntl(mine[i], F_SETFL, O_NONBLOCK);
    }

    pid = fork();
    if (pid == 0)
        child_exec(r, child_fds, errp[1]);

    close(errp[1]);
    if (r->use_pty)
        close(child_fds[0]);
    else
        close_fds(child_fds, 3);

    if (pid < 0) {
        conn_fail(c, errno, "spawn fork: %s", strerror(errno));
    } else {
        /* Blocks only until exec or the child's failure: like posix_spawn. */
        while (got < sizeof msg - 1) {
            n = read(errp[0], msg + got, sizeof msg - 1 - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += (size_t)n;
        }
        msg[got] = '\0';
    }
    close(errp[0]);
    if (pid < 0 || got > 0) {
        if (got > 0) {  /* the child's message is already "errno=..." */
            conn_send(c, 'F', msg, got);
            conn_end(c);
        }
        if (r->use_pty)
            close(mine[0]);
        else
            close_fds(mine, 3);
        return;         /* the failed child is reaped as an untracked pid */
    }

    struct proc *p = calloc(1, sizeof *p);
    if (!p)
        abort();
    p->pid = pid;
    p->pty = r->use_pty;
    p->in_fd = mine[0];
    p->out_fd = mine[1];
    p->err_fd = r->use_pty ? -1 : mine[2];
    p->session = r->session ? xstrdup(r->session) : NULL;
    p->keep = r->keep;
    if (r->keep) {
        struct buf cmd = {0};
        for (char **a = r->argv; *a; a++) {
            if (a != r->argv)
                buf_append(&cmd, " ", 1);
            buf_append(&cmd, *a, strlen(*a));
        }
        if (cmd.len > MAX_COMMAND)
            cmd.len = MAX_COMMAND;
        buf_append(&cmd, "", 1);
        p->command = cmd.data;
    }
    p->conn = c;
    c->proc = p;
    p->next = procs;
    procs = p;
    conn_send_u32(c, 'P', (uint32_t)pid);
}

/* ------------------------------------------------------- frame handlers */

static void protocol_error(struct conn *c, const char *what)
{
    conn_fail(c, EPROTO, "protocol: %s", what);
}

static void handle_hello(struct conn *c)
{
    conn_send(c, 'h', INIT_VERSION, strlen(INIT_VERSION));
}

static void handle_spawn(struct conn *c, char *payload, size_t n)
{
    struct spawn_req r;
    const char *bad;

    if (c->used) {
        conn_fail(c, EBUSY, "spawn: connection already has a process");
        return;
    }
    c->used = 1;
    bad = parse_spawn(payload, n, &r);
    if (bad)
        conn_fail(c, EINVAL, "spawn: %s", bad);
    else if (r.session && find_session(r.session))
        conn_fail(c, EEXIST, "spawn %s: session already exists", r.session);
    else {
        char **own_env = r.envp;
        if (!r.envp[0])
            r.envp = default_env;
        spawn_proc(c, &r);
        r.envp = own_env;
    }
    free(r.envp);
    free(r.argv);
}

static void handle_attach(struct conn *c, const char *payload, size_t n)
{
    char name[MAX_SESSION_NAME + 1];
    struct proc *p;

    if (c->used) {
        conn_fail(c, EBUSY, "attach: connection already has a process");
        return;
    }
    c->used = 1;
    if (n == 0 || n >= sizeof name || memchr(payload, '\0', n)) {
        conn_fail(c, EINVAL, "attach: bad session name");
        return;
    }
    memcpy(name, payload, n);
    name[n] = '\0';
    p = find_session(name);
    if (!p) {
        conn_fail(c, ENOENT, "attach %s: no such session", name);
        return;
    }
    if (p->conn) {
        conn_fail(c, EBUSY, "attach %s: session busy", name);
        return;
    }
    conn_send_u32(c, 'P', (uint32_t)p->pid);
    /* What the session wrote while nobody listened comes first (a kept
     * process: its whole tail, which it keeps). */
    if (p->held_out.len)
        conn_send(c, 'O', p->held_out.data + p->held_out.off, p->held_out.len);
    if (p->held_err.len)
        conn_send(c, 'R', p->held_err.data + p->held_err.off, p->held_err.len);
    if (!p->keep) {
        buf_free(&p->held_out);
        buf_free(&p->held_err);
    }
    if (p->reported) {      /* a kept process that has ended */
        conn_send_u32(c, 'E', (uint32_t)p->status);
        conn_end(c);
        return;
    }
    p->conn = c;
    c->proc = p;
}

static void append_record(struct buf *b, char key, const char *fmt, ...)
{
    char val[32];
    char head[2] = {key, ':'};
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(val, sizeof val, fmt, ap);
    va_end(ap);
    buf_append(b, head, 2);
    buf_append(b, val, strlen(val) + 1);
}

/* QUERY: the state of a named process without attaching to it, optionally
 * signalling it, sending its kept output, or forgetting it once ended. */
static void handle_query(struct conn *c, char *payload, size_t n)
{
    const char *name = NULL;
    int sig = 0, with_output = 0, remove = 0;
    struct buf b = {0};
    struct proc *p;

    if (c->used) {
        conn_fail(c, EBUSY, "query: connection already has a process");
        return;
    }
    c->used = 1;
    if (n == 0 || payload[n - 1] != '\0') {
        conn_fail(c, EINVAL, "query: records must be NUL-terminated");
        return;
    }
    for (char *rec = payload; rec < payload + n; rec += strlen(rec) + 1) {
        char *val = rec + 2, *end;
        if (strlen(rec) < 2 || rec[1] != ':') {
            conn_fail(c, EINVAL, "query: malformed record");
            return;
        }
        switch (rec[0]) {
        case 'n': name = val; break;
        case 'o': with_output = strcmp(val, "1") == 0; break;
        case 'r': remove = strcmp(val, "1") == 0; break;
        case 's':
            sig = (int)strtol(val, &end, 10);
            if (*end || sig < 1 || sig >= _NSIG) {
                conn_fail(c, EINVAL, "query: bad signal");
                return;
            }
            break;
        default:
            conn_fail(c, EINVAL, "query: unknown record key");
            return;
        }
    }
    if (!name || !*name || strlen(name) > MAX_SESSION_NAME) {
        conn_fail(c, EINVAL, "query: a name (n:) of 1-255 bytes is required");
        return;
    }
    p = find_session(name);
    if (!p) {
        conn_fail(c, ENOENT, "query %s: no such process", name);
        return;
    }
    if (remove && !p->reported) {
        conn_fail(c, EBUSY, "query %s: still running", name);
        return;
    }
    /* Only while init has not reaped it: its pid (the group's id) cannot have
     * been reused. */
    if (sig && !p->exited)
        kill(-p->pid, sig);
    append_record(&b, 'p', "%d", (int)p->pid);
    if (p->command) {
        buf_append(&b, "c:", 2);
        buf_append(&b, p->command, strlen(p->command) + 1);
    }
    append_record(&b, 'o', "%llu", (unsigned long long)p->out_total);
    append_record(&b, 'e', "%llu", (unsigned long long)p->err_total);
    if (p->reported)
        append_record(&b, 'x', "%d", p->status);
    conn_send(c, 'q', b.data, b.len);
    buf_free(&b);
    if (with_output && p->held_out.len)
        conn_send(c, 'O', p->held_out.data + p->held_out.off, p->held_out.len);
    if (with_output && p->held_err.len)
        conn_send(c, 'R', p->held_err.data + p->held_err.off, p->held_err.len);
    if (remove)
        proc_retire(p);
    conn_end(c);
}

static void handle_stdin(struct conn *c, const char *payload, size_t n)
{
    struct proc *p = c->proc;

    if (!p) {
        protocol_error(c, "stdin without a process");
        return;
    }
    if (p->stdin_eof || p->stdin_broken || p->in_fd < 0)
        return;
    buf_append(&p->stdin_buf, payload, n);
    proc_flush_stdin(p);
}

static void handle_stdin_eof(struct conn *c)
{
    struct proc *p = c->proc;

    if (!p) {
        protocol_error(c, "stdin eof without a process");
        return;
    }
    if (p->pty) {
        /* A pty has no half-close: send the terminal's EOF character, which
         * a canonical-mode reader sees as EOF at the start of a line. */
        struct termios t;
        char veof = 4;
        if (tcgetattr(p->out_fd, &t) == 0)
            veof = (char)t.c_cc[VEOF];
        if (!p->stdin_broken)
            buf_append(&p->stdin_buf, &veof, 1);
    } else {
        p->stdin_eof = 1;
    }
    proc_flush_stdin(p);
}

static void handle_signal(struct conn *c, const unsigned char *payload, size_t n)
{
    if (!c->proc || n != 4) {
        protocol_error(c, "bad signal frame");
        return;
    }
    kill(-c->proc->pid, (int)get_u32le(payload));  /* ESRCH once all gone */
}

static void handle_winsize(struct conn *c, const unsigned char *payload, size_t n)
{
    struct winsize ws = {0};

    if (!c->proc || n != 4) {
        protocol_error(c, "bad winsize frame");
        return;
    }
    if (!c->proc->pty)
        return;
    ws.ws_row = get_u16le(payload);
    ws.ws_col = get_u16le(payload + 2);
    ioctl(c->proc->out_fd, TIOCSWINSZ, &ws);
}

static void handle_list(struct conn *c)
{
    struct buf b = {0};
    char pid[16];

    for (struct proc *p = procs; p; p = p->next) {
        if (p->dead || !p->session)
            continue;
        snprintf(pid, sizeof pid, "%d", (int)p->pid);
        buf_append(&b, p->session, strlen(p->session) + 1);
        buf_append(&b, pid, strlen(pid) + 1);
    }
    conn_send(c, 'l', b.data, b.len);
    buf_free(&b);
    conn_end(c);
}

static void dispatch_frame(struct conn *c, char type, char *payload, size_t n)
{
    switch (type) {
    case 'H': handle_hello(c); break;
    case 'S': handle_spawn(c, payload, n); break;
    case 'A': handle_attach(c, payload, n); break;
    case 'I': handle_stdin(c, payload, n); break;
    case 'i': handle_stdin_eof(c); break;
    case 'K': handle_signal(c, (unsigned char *)payload, n); break;
    case 'W': handle_winsize(c, (unsigned char *)payload, n); break;
    case 'L': handle_list(c); break;
    case 'Q': handle_query(c, payload, n); break;
    default: protocol_error(c, "unknown frame type"); break;
    }
}

static int conn_stdin_full(const struct conn *c)
{
    return c->proc && c->proc->stdin_buf.len >= STDIN_LIMIT;
}

/* Handle every complete frame in c->in, unless the child's stdin is full
 * (`force`: the client is gone, take everything it sent). */
static void conn_process_frames(struct conn *c, int force)
{
    while (!c->dead && !c->closing && (force || !conn_stdin_full(c)) && c->in.len >= FRAME_HDR) {
        unsigned char *h = (unsigned char *)c->in.data + c->in.off;
        uint32_t n = get_u32le(h + 1);
        if (n > MAX_PAYLOAD) {
            protocol_error(c, "frame too large");
            return;
        }
        if (c->in.len < FRAME_HDR + n)
            return;
        /* The payload points into c->in; handlers never touch c->in. */
        dispatch_frame(c, (char)h[0], (char *)h + FRAME_HDR, n);
        buf_consume(&c->in, FRAME_HDR + n);
    }
}

static int conn_wants_input(const struct conn *c)
{
    return !c->closing && c->in.len < FRAME_HDR + MAX_PAYLOAD && !conn_stdin_full(c);
}

/* The client closed (or half-closed) its end.  Take what it sent before
 * closing (it may be stdin for a session), then close ours at once: CRIU
 * cannot dump a socket whose peer is gone, so none may linger. */
static void conn_hangup(struct conn *c)
{
    static char chunk[READ_CHUNK];
    ssize_t n;

    while (!c->closing && (n = read(c->fd, chunk, sizeof chunk)) > 0) {
        buf_append(&c->in, chunk, (size_t)n);
        conn_process_frames(c, 1);
    }
    conn_close(c);
}

static void conn_read(struct conn *c)
{
    static char chunk[READ_CHUNK];
    ssize_t n = read(c->fd, chunk, sizeof chunk);

    if (n > 0)
        buf_append(&c->in, chunk, (size_t)n);
    else if (n == 0)
        conn_hangup(c);
    else if (errno != EAGAIN && errno != EINTR)
        conn_close(c);
}

static void conn_flush(struct conn *c)
{
    while (!c->dead && c->out.len) {
        ssize_t n = send(c->fd, c->out.data + c->out.off, c->out.len,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0)
            buf_consume(&c->out, (size_t)n);
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && errno == EAGAIN)
            return;
        else
            conn_close(c);
    }
    if (!c->dead && c->closing)
        conn_close(c);
}

static void accept_conns(void)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                accept_paused = 1;  /* EMFILE & co: retry after a close */
            return;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (!c)
            abort();
        c->fd = fd;
        c->next = conns;
        conns = c;
    }
}

/* pid 1 reaps every zombie; exits of tracked processes are recorded. */
static void reap_children(void)
{
    struct signalfd_siginfo si;
    int status;
    pid_t pid;

    while (read(sig_fd, &si, sizeof si) == sizeof si)
        ;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (struct proc *p = procs; p; p = p->next) {
            if (!p->dead && !p->exited && p->pid == pid) {
                p->exited = 1;
                p->status = status;
                p->exit_ms = now_ms();
                break;
            }
        }
    }
}

/* -------------------------------------------------------------- event loop */

enum watch_kind { W_LISTEN, W_SIGNAL, W_CONN, W_OUT, W_ERR, W_IN };

struct watch {
    enum watch_kind kind;
    void *obj;
};

static struct pollfd *pfds;
static struct watch *watches;
static size_t nwatch, watch_cap;

static void watch(int fd, short events, enum watch_kind kind, void *obj)
{
    if (nwatch == watch_cap) {
        watch_cap = watch_cap ? watch_cap * 2 : 64;
        pfds = xrealloc(pfds, watch_cap * sizeof *pfds);
        watches = xrealloc(watches, watch_cap * sizeof *watches);
    }
    pfds[nwatch] = (struct pollfd){.fd = fd, .events = events};
    watches[nwatch] = (struct watch){.kind = kind, .obj = obj};
    nwatch++;
}

static void build_watches(void)
{
    nwatch = 0;
    if (!accept_paused)
        watch(listen_fd, POLLIN, W_LISTEN, NULL);
    watch(sig_fd, POLLIN, W_SIGNAL, NULL);
    for (struct conn *c = conns; c; c = c->next) {
        if (c->dead)
            continue;
        /* Always watched, even with no events: POLLHUP tells of a
         * vanished client. */
        watch(c->fd, (short)((conn_wants_input(c) ? POLLIN : 0) | (c->out.len ? POLLOUT : 0)),
              W_CONN, c);
    }
    for (struct proc *p = procs; p; p = p->next) {
        if (p->dead)
            continue;
        /* Backpressure: a slow client stops us reading its child. */
        int room = !p->conn || p->conn->out.len < OUT_LIMIT;
        if (room && !p->out_eof)
            watch(p->out_fd, POLLIN, W_OUT, p);
        if (room && p->err_fd >= 0 && !p->err_eof)
            watch(p->err_fd, POLLIN, W_ERR, p);
        if (p->stdin_buf.len && p->in_fd >= 0)
            watch(p->in_fd, POLLOUT, W_IN, p);
    }
}

static int poll_timeout(int64_t now)
{
    int64_t best = -1;

    for (struct proc *p = procs; p; p = p->next) {
        if (p->dead || !p->exited || p->reported || p->lingering || proc_output_done(p))
            continue;
        int64_t left = p->exit_ms + EOF_GRACE_MS - now;
        if (left < 0)
            left = 0;
        if (best < 0 || left < best)
            best = left;
    }
    return (int)best;
}

static void handle_event(size_t i)
{
    short rev = pfds[i].revents;
    struct conn *c = watches[i].obj;
    struct proc *p = watches[i].obj;

    if (!rev)
        return;
    switch (watches[i].kind) {
    case W_LISTEN:
        accept_conns();
        break;
    case W_SIGNAL:
        reap_children();
        break;
    case W_CONN:
        if (c->dead)
            break;
        if (rev & (POLLHUP | POLLERR))
            conn_hangup(c);
        else if (rev & POLLIN)
            conn_read(c);
        if (!c->dead && (rev & POLLOUT))
            conn_flush(c);
        break;
    case W_OUT:
        if (!p->dead && !p->out_eof)
            proc_read_once(p, 0);
        break;
    case W_ERR:
        if (!p->dead && !p->err_eof && p->err_fd >= 0)
            proc_read_once(p, 1);
        break;
    case W_IN:
        if (!p->dead)
            proc_flush_stdin(p);
        break;
    }
}

/* Free what was torn down this turn (pollfd watches pointed at it). */
static void sweep(void)
{
    for (struct conn **cp = &conns; *cp;) {
        struct conn *c = *cp;
        if (c->dead) {
            *cp = c->next;
            buf_free(&c->in);
            buf_free(&c->out);
            free(c);
        } else {
            cp = &c->next;
        }
    }
    for (struct proc **pp = &procs; *pp;) {
        struct proc *p = *pp;
        if (p->dead) {
            *pp = p->next;
            free(p);
        } else {
            pp = &p->next;
        }
    }
}

static _Noreturn void event_loop(void)
{
    for (;;) {
        build_watches();
        if (poll(pfds, nwatch, poll_timeout(now_ms())) < 0 && errno != EINTR)
            abort();    /* only EFAULT/EINVAL/ENOMEM: nothing sane to do */
        for (size_t i = 0; i < nwatch; i++)
            handle_event(i);

        int64_t now = now_ms();
        for (struct proc *p = procs; p; p = p->next)
            proc_check_done(p, now);
        for (struct conn *c = conns; c; c = c->next) {
            conn_process_frames(c, 0);    /* also resumes after stdin drained */
            if (!c->dead)
                conn_flush(c);
        }
        sweep();
    }
}

/* ------------------------------------------------------------ pid 1 setup */

static int sync_fd = -1;

/* Report "ERR <step>: <strerror>" to the launcher and give up. */
static _Noreturn void setup_fail(const char *step)
{
    char msg[512];
    int n = snprintf(msg, sizeof msg, "ERR %s: %s\n", step, strerror(errno));
    if (write(sync_fd, msg, (size_t)n) < 0)
        _exit(1);
    _exit(1);
}

#define CHECK(expr, step) do { if ((expr) < 0) setup_fail(step); } while (0)

/*
 * Everything below runs after pivot_root, in the sandbox's own tree, whose
 * contents root inside the sandbox (or a hostile image) wrote.  Two rules keep
 * that tree from steering us: nothing is prepared before pivot_root (so no
 * path can resolve to the host), and the top-level names we mount on or
 * change (proc, dev, tmp, .deltabox) are opened with O_NOFOLLOW and then used
 * through their fds, so a planted symlink is never followed even inside.
 */

/* The directory `name` in the root (our cwd), as an O_PATH fd; made if
 * missing.  A symlink or file there is replaced by an empty directory: these
 * names are ours (mount points, the init's copy), and following a symlink
 * would put /proc or /dev wherever the sandbox pointed it. */
static int own_dir(const char *name, mode_t mode)
{
    char step[64];

    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = openat(AT_FDCWD, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0)
            return fd;
        snprintf(step, sizeof step, "open /%s", name);
        if (errno == ENOTDIR || errno == ELOOP) {
            snprintf(step, sizeof step, "replace /%s (not a directory)", name);
            CHECK(unlinkat(AT_FDCWD, name, 0), step);
        } else if (errno != ENOENT) {
            setup_fail(step);
        }
        snprintf(step, sizeof step, "mkdir /%s", name);
        if (mkdirat(AT_FDCWD, name, mode) < 0 && errno != EEXIST)
            setup_fail(step);
    }
    snprintf(step, sizeof step, "open /%s", name);
    errno = ELOOP;  /* it was swapped twice under us: give up */
    setup_fail(step);
}

/* Mount a fresh `fstype` on the directory `target_fd` with the new mount API
 * (no path is resolved at all).  `opts` holds "key=value" or "flag" strings. */
static void mount_fd(int target_fd, const char *fstype, const char *const *opts, size_t nopts,
                     unsigned attrs, const char *step)
{
    int fs = fsopen(fstype, FSOPEN_CLOEXEC), mnt;

    CHECK(fs, step);
    for (size_t i = 0; i < nopts; i++) {
        char key[64];
        const char *eq = strchr(opts[i], '=');
        size_t n = eq ? (size_t)(eq - opts[i]) : strlen(opts[i]);

        if (n >= sizeof key) {
            errno = EINVAL;
            setup_fail(step);
        }
        memcpy(key, opts[i], n);
        key[n] = '\0';
        if (eq)
            CHECK(fsconfig(fs, FSCONFIG_SET_STRING, key, eq + 1, 0), step);
        else
            CHECK(fsconfig(fs, FSCONFIG_SET_FLAG, key, NULL, 0), step);
    }
    CHECK(fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0), step);
    mnt = fsmount(fs, FSMOUNT_CLOEXEC, attrs);
    CHECK(mnt, step);
    CHECK(move_mount(mnt, "", target_fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
          step);
    close(mnt);
    close(fs);
}

/* Bind `path` onto itself read-only (proc's knobs that must not change).
 * A path the kernel lacks (no CONFIG_MAGIC_SYSRQ) has nothing to protect. */
static void ro_bind(const char *path, const char *step)
{
    if (mount(path, path, NULL, MS_BIND, NULL) < 0) {
        if (errno == ENOENT)
            return;
        setup_fail(step);
    }
    CHECK(mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                NULL), step);
}

/* The empty directory bound over masked /proc dirs: one directory of /dev's tmpfs,
 * not a tmpfs per mask, since CRIU archives every tmpfs superblock with its own
 * `tar --gzip` inside the frozen window, binds of one superblock once. */
#define MASK_EMPTY_DIR SOCK_DIR "/empty"

/* Hide a /proc file (bind /dev/null over it) or directory (a read-only bind of
 * the empty MASK_EMPTY_DIR), as Docker's maskedPaths: host-wide kernel state the
 * sandbox has no business reading (kernel memory, other users' keys, timers of
 * every task). */
static void mask(const char *path)
{
    struct stat st;
    char step[80];

    if (lstat(path, &st) < 0)
        return;  /* not in this kernel */
    snprintf(step, sizeof step, "mask %s", path);
    if (S_ISDIR(st.st_mode)) {
        CHECK(mount(MASK_EMPTY_DIR, path, NULL, MS_BIND, NULL), step);
        CHECK(mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV |
                    MS_NOEXEC, NULL), step);
    } else {
        CHECK(mount("/dev/null", path, NULL, MS_BIND, NULL), step);
    }
}

/* Every other directory at the top of /proc is host-wide state of whichever drivers
 * this host loads (/proc/driver/nvidia/registry is writable by root on a GPU host, a
 * list like Docker's readonlyPaths cannot know them all): read-only, by default.
 * Left writable: the per-process dirs (numbers), /proc/pressure (a PSI trigger sets
 * nothing host-wide), links (self, thread-self, net, mounts). */
static void proc_dirs_read_only(void)
{
    DIR *d = opendir("proc");
    struct dirent *e;
    char path[NAME_MAX + 8];

    if (!d)
        setup_fail("open /proc");
    while ((e = readdir(d))) {
        if (e->d_type != DT_DIR || e->d_name[0] == '.' || isdigit((unsigned char)e->d_name[0]) ||
            !strcmp(e->d_name, "pressure") || !strcmp(e->d_name, "sys") ||
            !strcmp(e->d_name, "irq") || !strcmp(e->d_name, "bus") || !strcmp(e->d_name, "fs"))
            continue;
        snprintf(path, sizeof path, "proc/%s", e->d_name);
        ro_bind(path, "read-only /proc dir");
    }
    closedir(d);
}

static void make_node(int dev, const char *name, unsigned maj, unsigned min, const char *step)
{
    CHECK(mknodat(dev, name, S_IFCHR | 0666, makedev(maj, min)), step);
}

/* /proc, /dev and /tmp of the sandbox; cwd is its root (after pivot_root). */
static void setup_proc_and_dev(void)
{
    static const char *const devtmpfs_opts[] = {"mode=755", "size=65536k"};
    static const char *const devpts_opts[] = {"newinstance", "ptmxmode=0666", "mode=0620"};
    int proc = own_dir("proc", 0555), dev, fd;

    mount_fd(proc, "proc", NULL, 0, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
             "mount /proc");
    close(proc);
    /* procfs is the kernel's: paths inside it cannot be planted. */
    ro_bind("proc/sys", "bind /proc/sys");
    ro_bind("proc/sysrq-trigger", "bind /proc/sysrq-trigger");
    /* Host-wide knobs and device config under /proc (as Docker's readonlyPaths). */
    ro_bind("proc/irq", "bind /proc/irq");
    ro_bind("proc/bus", "bind /proc/bus");
    ro_bind("proc/fs", "bind /proc/fs");
    proc_dirs_read_only();

    /* A private /dev made of fresh nodes: bind-mounted host nodes would
     * break CRIU dumps and leak host devices. */
    dev = own_dir("dev", 0755);
    mount_fd(dev, "tmpfs", devtmpfs_opts, 2, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, "mount /dev");
    close(dev);
    /* The fresh tmpfs is ours alone: no sandbox process runs yet. */
    dev = open("dev", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(dev, "open /dev");
    make_node(dev, "null", 1, 3, "mknod /dev/null");
    make_node(dev, "zero", 1, 5, "mknod /dev/zero");
    make_node(dev, "full", 1, 7, "mknod /dev/full");
    make_node(dev, "random", 1, 8, "mknod /dev/random");
    make_node(dev, "urandom", 1, 9, "mknod /dev/urandom");
    make_node(dev, "tty", 5, 0, "mknod /dev/tty");
    CHECK(mkdirat(dev, "pts", 0755), "mkdir /dev/pts");
    fd = openat(dev, "pts", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(fd, "open /dev/pts");
    mount_fd(fd, "devpts", devpts_opts, 3, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, "mount /dev/pts");
    close(fd);
    CHECK(symlinkat("pts/ptmx", dev, "ptmx"), "symlink /dev/ptmx");
    CHECK(symlinkat("/proc/self/fd", dev, "fd"), "symlink /dev/fd");
    CHECK(symlinkat("/proc/self/fd/0", dev, "stdin"), "symlink /dev/stdin");
    CHECK(symlinkat("/proc/self/fd/1", dev, "stdout"), "symlink /dev/stdout");
    CHECK(symlinkat("/proc/self/fd/2", dev, "stderr"), "symlink /dev/stderr");
    /* /dev/shm is a directory of /dev's tmpfs, not a tmpfs of its own: one superblock
     * less for CRIU to tar and gzip while the sandbox is frozen.  It now has Docker's
     * /dev/shm limits (nosuid, noexec, 64 MiB: /dev's nodes and dirs use no blocks)
     * where it had no size cap but the memory cgroup and allowed exec; Docker's nodev
     * does not apply, moot without CAP_MKNOD. */
    CHECK(mkdirat(dev, "shm", 01777), "mkdir /dev/shm");
    CHECK(mkdirat(dev, ".deltabox", 0700), "mkdir " SOCK_DIR);
    fd = openat(dev, ".deltabox", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(fd, "open " SOCK_DIR);
    CHECK(mkdirat(fd, "empty", 0555), "mkdir " MASK_EMPTY_DIR);
    close(fd);
    close(dev);
    /* Root inside keeps CAP_DAC_OVERRIDE and CAP_FOWNER, so a mode cannot keep it out
     * of the empty dir: it is made a read-only mount itself (no CAP_SYS_ADMIN inside to
     * undo that), then every dir mask binds it read-only. */
    ro_bind(MASK_EMPTY_DIR, "read-only " MASK_EMPTY_DIR);

    /* Masks come last: they bind /dev/null. */
    static const char *const masked[] = {
        "proc/kcore", "proc/keys", "proc/key-users", "proc/timer_list", "proc/timer_stats",
        "proc/sched_debug", "proc/latency_stats", "proc/interrupts",
        "proc/acpi", "proc/asound", "proc/scsi",
        /* root-only kernel internals Docker leaves readable (sandbox root is uid 0):
         * kernel addresses, allocator state, physical page flags */
        "proc/vmallocinfo", "proc/slabinfo", "proc/pagetypeinfo", "proc/kpagecount",
        "proc/kpageflags", "proc/kpagecgroup",
    };
    for (size_t i = 0; i < sizeof masked / sizeof masked[0]; i++)
        mask(masked[i]);

    /* /tmp stays on the overlay, so it is checkpointed with the rest.  A /tmp
     * the sandbox made a symlink is its own business: left as it is. */
    if (mkdirat(AT_FDCWD, "tmp", 01777) < 0 && errno != EEXIST)
        setup_fail("mkdir /tmp");
    fd = openat(AT_FDCWD, "tmp", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0) {
        CHECK(fchmod(fd, 01777), "chmod /tmp");
        close(fd);
    } else if (errno != ELOOP && errno != ENOTDIR) {
        setup_fail("open /tmp");
    }
}

static void bring_up_loopback(void)
{
    struct ifreq ifr;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

    CHECK(s, "loopback socket");
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    CHECK(ioctl(s, SIOCGIFFLAGS, &ifr), "loopback SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP;
    CHECK(ioctl(s, SIOCSIFFLAGS, &ifr), "loopback SIOCSIFFLAGS");
    close(s);
}

/* Docker's default set minus MKNOD (the sandbox's /dev is fixed). */
static const int cap_allow[] = {
    CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FSETID, CAP_FOWNER, CAP_SETGID, CAP_SETUID,
    CAP_SETFCAP, CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT, CAP_KILL,
    CAP_AUDIT_WRITE, CAP_NET_RAW,
};

static int cap_allowed(int cap)
{
    for (size_t i = 0; i < sizeof cap_allow / sizeof cap_allow[0]; i++)
        if (cap_allow[i] == cap)
            return 1;
    return 0;
}

static int read_cap_last_cap(void)
{
    char s[16] = {0};
    int last = 63, fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);

    if (fd >= 0) {
        if (read(fd, s, sizeof s - 1) > 0)
            last = atoi(s);
        close(fd);
    }
    return last > 0 ? last : 63;
}

static void install_seccomp(void);

static void drop_capabilities(void)
{
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    int last = read_cap_last_cap();

    /* Bounding set first: dropping needs CAP_SETPCAP, which we keep anyway. */
    for (int cap = 0; cap <= last; cap++)
        if (!cap_allowed(cap) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            setup_fail("drop bounding capability");
    CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities");
    memset(data, 0, sizeof data);
    for (size_t i = 0; i < sizeof cap_allow / sizeof cap_allow[0]; i++) {
        int cap = cap_allow[i];
        uint32_t bit = 1u << (cap % 32);
        data[cap / 32].effective |= bit;
        data[cap / 32].permitted |= bit;
        data[cap / 32].inheritable |= bit;
    }
    CHECK(syscall(SYS_capset, &hdr, data), "capset");
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs");
    install_seccomp();
}

/*
 * The seccomp filter: Docker's default profile.  Allowed: the calls named in
 * seccomp-allow.txt (compiled into seccomp_allow.h for this architecture),
 * clone without namespace flags, ioctl but FS_IOC_FSSETXATTR/FS_IOC_SETFLAGS,
 * socket of any family but AF_VSOCK, and the personalities Docker allows.  Everything else fails with EPERM; clone3 with
 * ENOSYS (its flags live in memory a filter cannot read: libc falls back to
 * clone), as do calls of another ABI (i386, x32, arm32).  What is left out
 * and why (new user namespaces, keyrings, io_uring, bpf, mount, ...) is in
 * docs/security.md.  The filter is one linear list: since Linux 5.11 the
 * kernel caches every decision that does not read arguments, so its length
 * costs the hot path nothing.
 */
static const int allowed_syscalls[] = {
#include "seccomp_allow.h"
};

#if defined(__x86_64__)
#define SECCOMP_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SECCOMP_ARCH AUDIT_ARCH_AARCH64
#else
#error "deltabox-init: the seccomp filter covers x86-64 and aarch64"
#endif

/* Docker's mask (2114060288): every namespace clone() can create. */
#define CLONE_NAMESPACES (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | \
                          CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)
#define DENY(err) (SECCOMP_RET_ERRNO | (err))

static void install_seccomp(void)
{
    static struct sock_filter f[2 * (sizeof allowed_syscalls / sizeof allowed_syscalls[0]) + 40];
    static const uint32_t personalities[] = {0, 8, 0x20000, 0x20008, 0xffffffff};
    const size_t npers = sizeof personalities / sizeof personalities[0];
    size_t n = 0;

#define STMT(code, k)         (f[n++] = (struct sock_filter)BPF_STMT(code, k))
#define JUMP(k, jt, jf)       (f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, k, jt, jf))
#define LOAD(field)           STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))
#define RET(v)                STMT(BPF_RET | BPF_K, v)
    LOAD(arch);
    JUMP(SECCOMP_ARCH, 1, 0);
    RET(DENY(ENOSYS));
    LOAD(nr);
#ifdef __x86_64__
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, __X32_SYSCALL_BIT, 0, 1);
    RET(DENY(ENOSYS));
#endif
    for (size_t i = 0; i < sizeof allowed_syscalls / sizeof allowed_syscalls[0]; i++) {
        JUMP((uint32_t)allowed_syscalls[i], 0, 1);
        RET(SECCOMP_RET_ALLOW);
    }
    /* The blocks below end in a return, so a call that is not theirs falls
     * through with the syscall number still loaded.  Arguments are read as
     * their low 32 bits: clone ignores the high ones, the others are ints. */
    JUMP(__NR_clone, 0, 4);
    LOAD(args[0]);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NAMESPACES, 0, 1);
    RET(DENY(EPERM));
    RET(SECCOMP_RET_ALLOW);

    JUMP(__NR_clone3, 0, 1);
    RET(DENY(ENOSYS));

    /* ioctl: all but setting a file's project id or flags (its disk quota). */
    JUMP(__NR_ioctl, 0, 5);
    LOAD(args[1]);
    JUMP(FS_IOC_FSSETXATTR, 2, 0);
    JUMP(FS_IOC_SETFLAGS, 1, 0);
    RET(SECCOMP_RET_ALLOW);
    RET(DENY(EPERM));

    JUMP(__NR_socket, 0, 4);
    LOAD(args[0]);
    JUMP(AF_VSOCK, 0, 1);
    RET(DENY(EPERM));
    RET(SECCOMP_RET_ALLOW);

    JUMP(__NR_personality, 0, (uint8_t)(npers + 3));
    LOAD(args[0]);
    for (size_t i = 0; i < npers; i++)
        JUMP(personalities[i], (uint8_t)(npers - i), 0);
    RET(DENY(EPERM));
    RET(SECCOMP_RET_ALLOW);

    RET(DENY(EPERM));
#undef STMT
#undef JUMP
#undef LOAD
#undef RET
    struct sock_fprog prog = {.len = (unsigned short)n, .filter = f};
    CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0), "seccomp");
}

/* Keep nothing from the host: fds 0-2 become the sandbox's /dev/null. */
static void reset_fds(void)
{
    int fd;

    /* Move the sync pipe out of 0..2 so /dev/null can take them. */
    fd = fcntl(sync_fd, F_DUPFD_CLOEXEC, 3);
    CHECK(fd, "dup sync pipe");
    sync_fd = fd;
    if (sync_fd > 0)
        CHECK(close_range(0, (unsigned)sync_fd - 1, 0), "close_range");
    CHECK(close_range((unsigned)sync_fd + 1, ~0U, 0), "close_range");
    for (int i = 0; i < 3; i++)
        CHECK(open("/dev/null", O_RDWR), "open /dev/null");
}

static void open_control_socket(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};

    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    CHECK(listen_fd, "control socket");
    strcpy(sa.sun_path, SOCK_PATH);
    unlink(SOCK_PATH);
    CHECK(bind(listen_fd, (struct sockaddr *)&sa, sizeof sa), "bind " SOCK_PATH);
    CHECK(chmod(SOCK_PATH, 0600), "chmod " SOCK_PATH);
    CHECK(listen(listen_fd, 64), "listen " SOCK_PATH);
}

static void setup_signals(void)
{
    sigset_t chld;
    static const int ignored[] = {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

    /* pid 1 ignores signals it has no handler for, except from an ancestor
     * namespace; make that explicit so host-side TERM/HUP/INT don't queue
     * as pending signals in a dump either.  Only SIGKILL ends the sandbox. */
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++)
        signal(ignored[i], SIG_IGN);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    CHECK(sigprocmask(SIG_BLOCK, &chld, NULL), "sigprocmask");
    sig_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    CHECK(sig_fd, "signalfd");
}

struct options {
    const char *rootfs;
    const char *hostname;
    const char **cgroup_procs;
    int ncgroups;
    int memory_merge;
};

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif
#define MERGED_EXEC_FLAG "--exec-memory-merged"

#define SERVE_FLAG "--serve-as-pid1"
#define INIT_DIR   "/.deltabox"
#define INIT_NAME  "deltabox-init"
#define INIT_COPY  INIT_DIR "/" INIT_NAME

/* 1 if the two files hold the same bytes. */
static int same_content(int a, int b)
{
    static char ba[READ_CHUNK], bb[READ_CHUNK];
    struct stat sa, sb;
    ssize_t na, nb;

    if (fstat(a, &sa) < 0 || fstat(b, &sb) < 0 || sa.st_size != sb.st_size)
        return 0;
    for (;;) {
        na = read(a, ba, sizeof ba);
        nb = read(b, bb, sizeof bb);
        if (na != nb || na < 0)
            return 0;
        if (na == 0)
            return 1;
        if (memcmp(ba, bb, (size_t)na) != 0)
            return 0;
    }
}

/* A fresh name "<prefix>.<random>" in `dir` nobody can have planted. */
static void random_name(char *name, size_t size, const char *prefix)
{
    uint64_t r = 0;

    if (getrandom(&r, sizeof r, 0) != sizeof r)
        r ^= (uint64_t)now_ms() << 20 ^ (uint64_t)getpid();
    snprintf(name, size, "%s.%016llx", prefix, (unsigned long long)r);
}

/* Make INIT_COPY a copy of the running binary (unless it already is); returns
 * an fd of INIT_DIR.  Root inside the sandbox owns INIT_DIR: it may have put a
 * symlink, a directory or a FIFO at any name there, so the copy is written to
 * a fresh random name (O_EXCL) and renamed into place, and whatever is not a
 * regular file at INIT_NAME is moved aside rather than trusted or followed.
 * A relaunch must never fail because of what the sandbox left there. */
static int install_self_copy(void)
{
    struct stat st;
    char tmp[64];
    int exe, old, copy = -1, dir = own_dir(INIT_DIR + 1, 0700);

    exe = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    CHECK(exe, "open /proc/self/exe");
    old = openat(dir, INIT_NAME, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (old >= 0) {
        int same = fstat(old, &st) == 0 && S_ISREG(st.st_mode) && same_content(exe, old);
        close(old);
        if (same) {
            close(exe);
            return dir;
        }
        CHECK(lseek(exe, 0, SEEK_SET), "seek /proc/self/exe");
    }
    if (fstatat(dir, INIT_NAME, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode)) {
        random_name(tmp, sizeof tmp, ".deltabox-init.moved-aside");
        CHECK(renameat(dir, INIT_NAME, dir, tmp), "move aside " INIT_COPY " (a directory)");
    }
    CHECK(fstat(exe, &st), "stat /proc/self/exe");
    for (int i = 0; copy < 0 && i < 16; i++) {
        random_name(tmp, sizeof tmp, ".deltabox-init.new");
        copy = openat(dir, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0500);
        if (copy < 0 && errno != EEXIST)
            break;
    }
    CHECK(copy, "create " INIT_DIR "/.deltabox-init.new.*");
    for (off_t done = 0; done < st.st_size;) {
        ssize_t n = sendfile(copy, exe, NULL, (size_t)(st.st_size - done));
        if (n <= 0) {
            if (n == 0)
                errno = EIO;
            setup_fail("copy /proc/self/exe");
        }
        done += n;
    }
    close(exe);
    CHECK(close(copy), "write " INIT_DIR "/.deltabox-init.new.*");
    /* rename (never follows): a running init elsewhere keeps its (old) inode */
    CHECK(renameat(dir, tmp, dir, INIT_NAME), "rename " INIT_COPY);
    return dir;
}

/* Re-execute ourselves from a copy inside the sandbox's root filesystem.
 * The launcher's binary lives on a host mount the sandbox cannot see, and
 * CRIU cannot dump a mapping of a file it cannot find in the dumped mount
 * namespace.  On the overlay the copy costs a dump nothing (a tmpfs copy
 * would be tar+gzipped into every image, a memfd exe CRIU 4.1 cannot
 * restore), and it is checkpointed with the layers, so the binary in a
 * branch always matches the process images taken on it, across upgrades. */
static _Noreturn void reexec_from_sandbox(void)
{
    char fdarg[16];
    char *argv[] = {"deltabox-init", SERVE_FLAG, fdarg, NULL};
    char *envp[] = {NULL};
    int dir = install_self_copy();

    /* The sync pipe is the one fd that must cross the exec. */
    CHECK(fcntl(sync_fd, F_SETFD, 0), "sync pipe cloexec");
    snprintf(fdarg, sizeof fdarg, "%d", sync_fd);
    execveat(dir, INIT_NAME, argv, envp, AT_SYMLINK_NOFOLLOW);
    setup_fail("exec " INIT_COPY);
}

/* pid 1 after the re-exec: serve the control socket. */
static _Noreturn void serve_pid1(const char *fdarg)
{
    sync_fd = atoi(fdarg);
    if (getpid() != 1 || sync_fd < 3 || fcntl(sync_fd, F_SETFD, FD_CLOEXEC) < 0) {
        fprintf(stderr, "deltabox-init: %s is internal\n", SERVE_FLAG);
        exit(2);
    }
    /* Not dumpable: without CAP_SYS_PTRACE (dropped) no process of the sandbox
     * can ptrace pid 1 or read its memory, so root inside cannot take over the
     * process the daemon talks to.  (execve reset it; CRIU, with every
     * capability, still dumps us and restores the flag.) */
    CHECK(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable");
    open_control_socket();
    setup_signals();
    clearenv();
    setenv("PATH", DEFAULT_PATH, 1);

    if (write(sync_fd, "OK\n", 3) != 3)
        _exit(1);   /* the launcher is gone: nobody would know our pid */
    close(sync_fd);
    sync_fd = -1;
    event_loop();
}

static _Noreturn void run_pid1(const struct options *o)
{
    /* Our own session: CRIU refuses a tree whose session leader is
     * outside the pid namespace (the launcher's session is). */
    CHECK(setsid(), "setsid");
    /* The sandbox's memory limit must kill the hog, never its init (while we
     * still hold CAP_SYS_RESOURCE, needed to go below 0). */
    write_oom_score_adj("-1000");
    umask(0);
    CHECK(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), "make mounts private");
    /* Into the sandbox's tree before touching anything in it: from here on
     * every path, and every symlink the sandbox planted, resolves inside the
     * branch.  pivot_root(".", "."): the old root ends up stacked on the new
     * one and is detached right away; no put_old directory is needed. */
    CHECK(chdir(o->rootfs), "chdir rootfs");
    CHECK(syscall(SYS_pivot_root, ".", "."), "pivot_root");
    CHECK(umount2(".", MNT_DETACH), "umount old root");
    CHECK(chdir("/"), "chdir /");
    setup_proc_and_dev();

    CHECK(sethostname(o->hostname, strlen(o->hostname)), "sethostname");
    bring_up_loopback();
    drop_capabilities();
    reset_fds();
    umask(022);
    reexec_from_sandbox();
}

/* ---------------------------------------------------------------- launcher */

static _Noreturn void usage(void)
{
    fprintf(stderr, "usage: deltabox-init --rootfs DIR --hostname NAME [--cgroup-procs FILE]... "
                    "[--memory-merge yes|no]\n"
                    "       deltabox-init " MERGED_EXEC_FLAG " PROG [ARG]...\n");
    exit(2);
}

static void parse_options(int argc, char **argv, struct options *o)
{
    memset(o, 0, sizeof *o);
    o->cgroup_procs = xrealloc(NULL, (size_t)argc * sizeof(char *));
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *val = argv[++i];
        if (strcmp(opt, "--rootfs") == 0)
            o->rootfs = val;
        else if (strcmp(opt, "--hostname") == 0)
            o->hostname = val;
        else if (strcmp(opt, "--cgroup-procs") == 0)
            o->cgroup_procs[o->ncgroups++] = val;
        else if (strcmp(opt, "--memory-merge") == 0 && strcmp(val, "yes") == 0)
            o->memory_merge = 1;
        else if (strcmp(opt, "--memory-merge") == 0 && strcmp(val, "no") == 0)
            o->memory_merge = 0;
        else
            usage();
    }
    if (!o->rootfs || !o->hostname)
        usage();
}

static int join_cgroup(const char *procs_file)
{
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    int fd = open(procs_file, O_WRONLY | O_CLOEXEC);

    if (fd < 0)
        return -1;
    if (write(fd, pid, (size_t)n) != n) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return close(fd);
}

int main(int argc, char **argv)
{
    struct options o;
    int sync_pipe[2];
    char msg[1024];
    size_t got = 0;
    ssize_t n;
    pid_t child;

    if (argc == 3 && strcmp(argv[1], SERVE_FLAG) == 0)
        serve_pid1(argv[2]);
    if (argc >= 3 && strcmp(argv[1], MERGED_EXEC_FLAG) == 0) {
        if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) < 0) {
            fprintf(stderr, "ERR memory-merge: %s\n", strerror(errno));
            return 1;
        }
        execv(argv[2], argv + 2);
        fprintf(stderr, "ERR exec %s: %s\n", argv[2], strerror(errno));
        return 127;
    }
    parse_options(argc, argv, &o);
    /* Before the fork of pid 1: everything in the sandbox descends from it. */
    if (o.memory_merge && prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) < 0) {
        fprintf(stderr, "ERR memory-merge: %s\n", strerror(errno));
        return 1;
    }
    for (int i = 0; i < o.ncgroups; i++) {
        if (join_cgroup(o.cgroup_procs[i]) < 0) {
            fprintf(stderr, "ERR cgroup %s: %s\n", o.cgroup_procs[i], strerror(errno));
            return 1;
        }
    }
    if (unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID) < 0) {
        fprintf(stderr, "ERR unshare: %s\n", strerror(errno));
        return 1;
    }
    if (pipe2(sync_pipe, O_CLOEXEC) < 0) {
        fprintf(stderr, "ERR pipe: %s\n", strerror(errno));
        return 1;
    }
    fflush(NULL);
    child = fork();
    if (child < 0) {
        fprintf(stderr, "ERR fork: %s\n", strerror(errno));
        return 1;
    }
    if (child == 0) {
        close(sync_pipe[0]);
        sync_fd = sync_pipe[1];
        run_pid1(&o);
    }

    close(sync_pipe[1]);
    while (got < sizeof msg - 1) {
        n = read(sync_pipe[0], msg + got, sizeof msg - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    msg[got] = '\0';
    if (strcmp(msg, "OK\n") == 0) {
        printf("%d\n", (int)child);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (got == 0)
        fprintf(stderr, "ERR setup: init exited before reporting\n");
    else
        fputs(msg, stderr);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
        ;
    return 1;
}
