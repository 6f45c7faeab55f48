/*
 * riklet-shim: the per-pod holder of a process pod. One small process per pod (libc only, a few
 * hundred KiB of PSS, a millisecond or two to start) instead of a Python interpreter per pod.
 *
 * Usage: riklet-shim POD_DIR < SPEC
 *        riklet-shim --serve (stdin: a SOCK_SEQPACKET socket; see serve())
 *
 * The program forks; the child calls setsid() and becomes the shim, an orphan from the start.
 * The parent waits on a pipe until the shim has started every container once (each exec
 * succeeded or failed) and written its first POD_DIR/status.json, then prints the shim's pid on
 * stdout and exits 0; on failure it prints the reason on stderr and exits 1 (2: a bad spec).
 * As a fork-server (--serve), it forks a shim per request instead: the manager's way, which
 * spares each pod a program start.
 *
 * The shim is a child subreaper: every process of the pod stays its descendant and is reaped
 * by it. It runs each container (own process group, cgroups joined before exec, output to a
 * size-rotated log), restarts them by policy with back-off, rewrites POD_DIR/status.json
 * atomically on every change (the format of services/manager/process/shimctl.py; once a stop
 * begins, writes wait STOPPING_QUIET, so a pod gone by then is written once, "exited"), and on
 * SIGTERM or SIGINT stops the pod: SIGTERM to each container's group, after the grace period
 * SIGKILL to the groups, the cgroups and every descendant, repeated until none is left; then it
 * removes the cgroups, writes state "exited" ("cgroups_left": true if one stayed) and exits.
 * Its own log: POD_DIR/shim.log, one JSON line per event.
 *
 * Input: the spec on stdin (read to its end before anything else), written by
 * services/manager/process/shim.py (shimspec.py) from the pod's spec. A sequence of records, each `KEY LEN:BYTES\n` (KEY a word, LEN the decimal length of BYTES;
 * BYTES may hold any byte but NUL). Pod records first, then per container a `container` record
 * followed by that container's records:
 *
 *   pod NAME | uid UID | grace SECONDS | notify SOCKET_PATH (optional)
 *   driver JSON (optional: the manager's own facts, copied as is into status.json's "driver")
 *   log_max BYTES | log_files N | backoff_initial S | backoff_max S | backoff_reset S
 *   shm_size BYTES (0: the kernel's default) | pod_cgroup DIR (repeated: removed at the end)
 *   container NAME
 *     argv ARG (repeated, at least one) | env NAME=VALUE (repeated: the whole environment)
 *     cwd DIR | user UID:GID | policy Always|OnFailure|Never | log PATH (NAME.log)
 *     cgroup RELPATH (for the status) | cgroup_dir DIR (repeated: one per hierarchy; the pid
 *     goes into DIR/cgroup.procs, members are killed, DIR is removed at the end)
 *     freezer FILE (v1 freezer.state: frozen while its members are killed)
 *     oom_file FILE | oom_key KEY (the OOM-kill counter: `KEY N` line of FILE)
 *     cgroup_error MESSAGE (its cgroups could not be prepared: ends as CgroupsUnavailable)
 *     mount_src PATH | mount_dst PATH | mount_ro 0|1 (repeated, in order: a volume bind-mounted
 *     on mount_dst in the container's own mount namespace before exec; with any, the container
 *     also gets no_new_privs, so no setuid program trusts what a volume put over host paths)
 *   tmpfs DIR | tmpfs_size BYTES (pod records, repeated in order: a Memory emptyDir, a tmpfs
 *   mounted on DIR in the pod's private mount namespace; 0: the kernel's default size)
 */
#define _GNU_SOURCE
/* Messages and paths are cut to their buffers on purpose (the limits are documented above). */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (64 * 1024)
#define READS_PER_TURN 16 /* bounded so that one chatty container cannot starve the others */
#define PIPE_SIZE (1 << 20) /* a burst of output fits while the shim is busy elsewhere */
#define KILL_SWEEP 0.5 /* once the grace period is over, how often leftovers get SIGKILL again */
#define MSG_MAX 512 /* a termination message (start errors name a path: truncated past this) */
#define PATH_BUF 4352 /* PATH_MAX and room for a suffix */
#define MAX_SPEC_BYTES (16u << 20) /* a spec larger than this is refused */
#define STOPPING_QUIET 0.2 /* a stop's status waits this long: most pods are gone by then */

enum { WAITING, RUNNING, TERMINATED };
static const char *CSTATE[] = {"waiting", "running", "terminated"};
enum { POD_RUNNING, POD_STOPPING, POD_EXITED };
static const char *PSTATE[] = {"running", "stopping", "exited"};
enum { ALWAYS, ON_FAILURE, NEVER };
enum { COMPLETED, ERROR, SIGNALED, OOM_KILLED, START_ERROR, CGROUPS_UNAVAILABLE };
static const char *REASON[] = {"Completed", "Error", "Signaled", "OOMKilled", "StartError",
                               "CgroupsUnavailable"};

struct term {
    int has_code, code, sig, reason; /* sig 0: none */
    char msg[MSG_MAX];               /* "" with has_msg 0: null */
    int has_msg;
};

struct ctr {
    /* from the spec */
    const char *name, *log_path, *cwd, *cgroup, *freezer, *oom_file, *oom_key, *cg_error;
    char **argv, **envp, **dirs, **mnt_src, **mnt_dst, **mnt_ro;
    int nargv, nenv, ndirs, nmounts, policy, has_user;
    uid_t uid;
    gid_t gid;
    /* observed; times below 0 mean "none" */
    int state, starts, out, logfd, log_broken, has_end, has_last, has_start_err;
    pid_t pid;
    long long pid_start, oom_before;
    double started_at, started_mono, finished_at, delay, restart_due, next_restart_at, last_started;
    struct term end, last, start_err;
    long long log_size;
    int timesfd;                /* the time index beside the log (common/logindex.py), -1: none */
    long long times_last;       /* when its last record was written (ns), -1: none yet */
};

static struct {
    const char *dir, *pod, *uid, *notify, *driver;
    double grace, bo_initial, bo_max, bo_reset;
    long long log_max, log_files, shm_size;
    char **pod_dirs, **tmpfs, **tmpfs_size;
    int ntmpfs, private_ns, npod_dirs, nctrs, state, children, epfd, sigfd, notify_fd, dirty, stop_asked, ready_fd;
    int cgroups_left; /* a group could not be removed at the end (status: "cgroups_left") */
    struct ctr *ctrs;
    long long start_time;
    double kill_at, quiet_until; /* quiet_until: status writes wait until then (a stop) */
    pid_t self;
    char status_path[PATH_BUF], status_tmp[PATH_BUF];
} g;

static char chunk[READ_CHUNK];

/* ---- small helpers ------------------------------------------------------------------------ */

static double now_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int write_file(const char *path, const char *value) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = write_all(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Up to size-1 bytes of a file, NUL-terminated; the length, or -1. */
static ssize_t read_small(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t got = 0;
    while (got < size - 1) {
        ssize_t r = read(fd, buf + got, size - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    buf[got] = 0;
    return (ssize_t)got;
}

/* Field 22 of /proc/PID/stat (start time in clock ticks since boot), or -1. */
static long long proc_start(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if (read_small(path, buf, sizeof buf) <= 0)
        return -1;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p)
        return -1;
    p++;
    for (int field = 3; field < 22 && p; field++) /* p: the space before field 3 */
        p = strchr(p + 1, ' ');
    return p ? strtoll(p + 1, NULL, 10) : -1;
}

/* ---- JSON output into a fixed buffer, flushed to a file descriptor ------------------------- */

static struct {
    char buf[4096];
    size_t len;
    int fd, failed;
} jo;

static void j_flush(void) {
    if (jo.len && !jo.failed && write_all(jo.fd, jo.buf, jo.len) < 0)
        jo.failed = errno ? errno : EIO;
    jo.len = 0;
}

static void j_put(const char *s, size_t n) {
    while (n > 0) {
        if (jo.len == sizeof jo.buf)
            j_flush();
        size_t take = sizeof jo.buf - jo.len < n ? sizeof jo.buf - jo.len : n;
        memcpy(jo.buf + jo.len, s, take);
        jo.len += take;
        s += take;
        n -= take;
    }
}

static void j_raw(const char *s) { j_put(s, strlen(s)); }

static void j_fmt(const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    j_put(tmp, n < (int)sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when it is not one. */
static int utf8_len(const unsigned char *s) {
    int n = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 && s[0] < 0xe0 ? 2 : 0;
    for (int i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    return n;
}

/* A JSON string; bytes that are not UTF-8 become U+FFFD, so the file always parses. */
static void j_str(const char *s) {
    j_put("\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p++};
            j_put(esc, 2);
        } else if (*p < 0x20) {
            j_fmt("\\u%04x", *p++);
        } else if (*p < 0x80) {
            j_put((const char *)p++, 1);
        } else {
            int n = utf8_len(p);
            if (n) {
                j_put((const char *)p, (size_t)n);
                p += n;
            } else {
                j_raw("\\ufffd");
                p++;
            }
        }
    }
    j_put("\"", 1);
}

static void j_time(double t) {
    if (t < 0)
        j_raw("null");
    else
        j_fmt("%.6f", t);
}

/* ---- the shim's own log: one JSON line per event on stderr (POD_DIR/shim.log) -------------- */

/* key/value string pairs after msg, ended by NULL */
static void log_event(const char *level, const char *msg, ...) {
    char ts[32];
    struct timespec now;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    j_flush();
    jo.fd = 2;
    jo.failed = 0;
    j_raw("{\"ts\":\"");
    j_raw(ts);
    j_fmt(".%03ldZ\",\"level\":", now.tv_nsec / 1000000);
    j_str(level);
    j_raw(",\"service\":\"riklet-shim\",\"logger\":\"riklet.shim\",\"msg\":");
    j_str(msg);
    va_list ap;
    va_start(ap, msg);
    for (const char *k; (k = va_arg(ap, const char *));) {
        const char *v = va_arg(ap, const char *);
        j_raw(",");
        j_str(k);
        j_raw(":");
        j_str(v ? v : "");
    }
    va_end(ap);
    j_raw("}\n");
    j_flush(); /* one write per line: lines of concurrent writers do not interleave */
}

/* ---- the spec ------------------------------------------------------------------------------ */

struct rec {
    char *key, *val;
};

static const char *spec_error;

static int parse_records(char *buf, size_t len, struct rec **out) {
    size_t cap = 64, n = 0;
    struct rec *r = malloc(cap * sizeof *r);
    char *p = buf, *end = buf + len;
    while (r && p < end) {
        char *sp = memchr(p, ' ', (size_t)(end - p));
        char *colon = sp ? memchr(sp, ':', (size_t)(end - sp)) : NULL;
        if (!colon) {
            spec_error = "a record is not `KEY LEN:BYTES`";
            free(r);
            return -1;
        }
        *sp = 0;
        char *digits_end;
        unsigned long long vlen = strtoull(sp + 1, &digits_end, 10);
        if (digits_end != colon || vlen + 1 >= (unsigned long long)(end - colon) || colon[1 + vlen] != '\n' ||
            memchr(colon + 1, 0, vlen)) {
            spec_error = "a record's length does not match its bytes";
            free(r);
            return -1;
        }
        colon[1 + vlen] = 0; /* the newline ends the value as a C string */
        if (n == cap) {
            struct rec *bigger = realloc(r, (cap *= 2) * sizeof *r);
            if (!bigger)
                break;
            r = bigger;
        }
        r[n].key = p;
        r[n++].val = colon + 1;
        p = colon + 2 + vlen;
    }
    if (!r || p < end) {
        spec_error = "out of memory";
        free(r);
        return -1;
    }
    *out = r;
    return (int)n;
}

static char **collect(struct rec *r, int from, int to, const char *key, int *count) {
    int n = 0;
    for (int i = from; i < to; i++)
        n += strcmp(r[i].key, key) == 0;
    char **list = calloc((size_t)n + 1, sizeof *list);
    if (!list)
        return NULL;
    n = 0;
    for (int i = from; i < to; i++)
        if (strcmp(r[i].key, key) == 0)
            list[n++] = r[i].val;
    *count = n;
    return list;
}

static const char *find(struct rec *r, int from, int to, const char *key) {
    for (int i = from; i < to; i++)
        if (strcmp(r[i].key, key) == 0)
            return r[i].val;
    return NULL;
}

static int parse_container(struct ctr *c, struct rec *r, int from, int to) {
    memset(c, 0, sizeof *c);
    c->name = r[from].val;
    c->log_path = find(r, from, to, "log");
    c->cwd = find(r, from, to, "cwd");
    c->cgroup = find(r, from, to, "cgroup");
    c->freezer = find(r, from, to, "freezer");
    c->oom_file = find(r, from, to, "oom_file");
    c->oom_key = find(r, from, to, "oom_key");
    c->cg_error = find(r, from, to, "cgroup_error");
    c->argv = collect(r, from, to, "argv", &c->nargv);
    c->envp = collect(r, from, to, "env", &c->nenv);
    c->dirs = collect(r, from, to, "cgroup_dir", &c->ndirs);
    int nsrc, ndst, nro;
    c->mnt_src = collect(r, from, to, "mount_src", &nsrc);
    c->mnt_dst = collect(r, from, to, "mount_dst", &ndst);
    c->mnt_ro = collect(r, from, to, "mount_ro", &nro);
    if (!c->mnt_src || !c->mnt_dst || !c->mnt_ro)
        return spec_error = "out of memory", -1;
    if (nsrc != ndst || nsrc != nro)
        return spec_error = "mount_src, mount_dst and mount_ro do not pair up", -1;
    c->nmounts = nsrc;
    const char *policy = find(r, from, to, "policy"), *user = find(r, from, to, "user");
    if (!c->argv || !c->envp || !c->dirs)
        return spec_error = "out of memory", -1;
    if (!c->nargv || !c->log_path || !policy || (c->oom_file && !c->oom_key))
        return spec_error = "a container lacks argv, log, policy or oom_key", -1;
    c->policy = !strcmp(policy, "Always") ? ALWAYS : !strcmp(policy, "OnFailure") ? ON_FAILURE
              : !strcmp(policy, "Never") ? NEVER : -1;
    if (c->policy < 0)
        return spec_error = "unknown policy", -1;
    if (user) {
        unsigned long u, gr;
        if (sscanf(user, "%lu:%lu", &u, &gr) != 2)
            return spec_error = "user is not UID:GID", -1;
        c->has_user = 1, c->uid = (uid_t)u, c->gid = (gid_t)gr;
    }
    c->out = c->logfd = c->timesfd = -1;
    c->started_at = c->finished_at = c->delay = c->restart_due = c->next_restart_at = -1;
    c->last_started = -1;
    c->pid_start = -1;
    return 0;
}

static int number(struct rec *r, int n, const char *key, double *out) {
    const char *v = find(r, 0, n, key);
    char *e;
    static char error[64];
    snprintf(error, sizeof error, "%s: missing, or not a number >= 0", key);
    if (!v)
        return spec_error = error, -1;
    *out = strtod(v, &e);
    if (e == v || *e || !(*out >= 0) || *out > 1e15)
        return spec_error = error, -1;
    return 0;
}

static int parse_spec(char *buf, size_t len) {
    struct rec *r;
    int n = parse_records(buf, len, &r);
    if (n < 0)
        return -1;
    int first = 0;
    while (first < n && strcmp(r[first].key, "container"))
        first++;
    double log_max, log_files, shm;
    g.pod = find(r, 0, first, "pod");
    g.uid = find(r, 0, first, "uid");
    g.notify = find(r, 0, first, "notify");
    g.driver = find(r, 0, first, "driver");
    if (!g.pod || !g.uid)
        return spec_error = "pod or uid missing", -1;
    if (number(r, first, "grace", &g.grace) || number(r, first, "log_max", &log_max) ||
        number(r, first, "log_files", &log_files) || number(r, first, "backoff_initial", &g.bo_initial) ||
        number(r, first, "backoff_max", &g.bo_max) || number(r, first, "backoff_reset", &g.bo_reset) ||
        number(r, first, "shm_size", &shm))
        return -1;
    g.log_max = (long long)log_max, g.log_files = (long long)log_files, g.shm_size = (long long)shm;
    if (g.log_max < 1 || g.log_files < 1)
        return spec_error = "log_max and log_files must be at least 1", -1;
    g.pod_dirs = collect(r, 0, first, "pod_cgroup", &g.npod_dirs);
    int nsizes = 0;
    g.tmpfs = collect(r, 0, first, "tmpfs", &g.ntmpfs);
    g.tmpfs_size = collect(r, 0, first, "tmpfs_size", &nsizes);
    if (!g.tmpfs || !g.tmpfs_size || nsizes != g.ntmpfs)
        return spec_error = "tmpfs and tmpfs_size do not pair up", -1;
    for (int i = first; i < n; i++)
        g.nctrs += !strcmp(r[i].key, "container");
    g.ctrs = calloc((size_t)g.nctrs + 1, sizeof *g.ctrs);
    if (!g.ctrs || !g.pod_dirs || !g.nctrs)
        return spec_error = g.nctrs ? "out of memory" : "no container", -1;
    for (int i = first, k = 0; i < n; k++) {
        int j = i + 1;
        while (j < n && strcmp(r[j].key, "container"))
            j++;
        if (parse_container(&g.ctrs[k], r, i, j))
            return -1;
        i = j;
    }
    free(r); /* the values stay in buf */
    return 0;
}

/* The spec comes on stdin, to its end (the spawner writes it and closes the pipe). */
static int load_spec(void) {
    size_t cap = 4096, got = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        if (got == cap) {
            char *more = cap < MAX_SPEC_BYTES ? realloc(buf, cap * 2 + 1) : NULL;
            if (!more) {
                free(buf);
                return spec_error = "larger than the shim accepts", -1;
            }
            buf = more;
            cap *= 2;
        }
        ssize_t r = read(0, buf + got, cap - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            free(buf);
            return spec_error = strerror(errno), -1;
        }
        if (r == 0) {
            buf[got] = 0;
            return parse_spec(buf, got);
        }
        got += (size_t)r;
    }
    return spec_error = "out of memory", -1;
}

/* ---- status.json and the notification ------------------------------------------------------ */

/* The name Python's signal.Signals gives a number, or SIG<number> where it has none. */
static const char *sig_name(int sig, char *buf, size_t size) {
    const char *s = sig == SIGABRT ? "ABRT" : sig == SIGIO ? "IO" : sig == SIGCHLD ? "CHLD"
                  : sig == SIGRTMIN ? "RTMIN" : sig == SIGRTMAX ? "RTMAX"
                  : sig > SIGSYS ? NULL : sigabbrev_np(sig);
    if (s)
        snprintf(buf, size, "SIG%s", s);
    else
        snprintf(buf, size, "SIG%d", sig);
    return buf;
}

static void j_term_fields(const struct term *t) {
    if (t->has_code)
        j_fmt("\"exitCode\":%d,\"signal\":", t->code);
    else
        j_raw("\"exitCode\":null,\"signal\":");
    if (t->sig) {
        char name[16];
        j_str(sig_name(t->sig, name, sizeof name));
    } else {
        j_raw("null");
    }
    j_raw(",\"reason\":");
    j_str(REASON[t->reason]);
    j_raw(",\"message\":");
    if (t->has_msg)
        j_str(t->msg);
    else
        j_raw("null");
}

static void j_container(const struct ctr *c) {
    j_raw("{\"name\":");
    j_str(c->name);
    j_raw(",\"state\":");
    j_str(CSTATE[c->state]);
    if (c->pid)
        j_fmt(",\"pid\":%d", (int)c->pid);
    else
        j_raw(",\"pid\":null");
    if (c->pid && c->pid_start >= 0)
        j_fmt(",\"pid_start\":%lld", c->pid_start);
    else
        j_raw(",\"pid_start\":null");
    j_fmt(",\"restartCount\":%d,", c->starts > 1 ? c->starts - 1 : 0);
    if (c->has_end) {
        j_term_fields(&c->end);
    } else {
        j_raw("\"exitCode\":null,\"signal\":null,\"reason\":null,\"message\":null");
    }
    j_raw(",\"startedAt\":");
    j_time(c->started_at);
    j_raw(",\"finishedAt\":");
    j_time(c->has_end ? c->finished_at : -1);
    j_raw(",\"nextRestartAt\":");
    j_time(c->next_restart_at);
    j_raw(",\"cgroup\":");
    if (c->cgroup)
        j_str(c->cgroup);
    else
        j_raw("null");
    j_raw(",\"lastTermination\":");
    if (c->has_last) {
        j_raw("{");
        j_term_fields(&c->last);
        j_raw(",\"finishedAt\":");
        j_time(c->finished_at >= 0 ? c->finished_at : 0.0);
        j_raw(",\"startedAt\":");
        j_time(c->last_started);
        j_raw("}");
    } else {
        j_raw("null");
    }
    j_raw("}");
}

static void notify(void) {
    if (g.notify_fd < 0)
        return;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, g.notify, sizeof addr.sun_path - 1);
    /* nobody listening is normal: the manager reads status.json again when it comes back */
    (void)sendto(g.notify_fd, g.pod, strlen(g.pod), MSG_DONTWAIT | MSG_NOSIGNAL,
                 (struct sockaddr *)&addr, sizeof addr);
}

/* tmp + rename, no fsync: the page cache outlives any process kill, and a machine crash takes
 * the workloads with it, so there is nothing a synced status could describe afterwards. */
static void write_status(void) {
    j_flush();
    jo.fd = open(g.status_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    jo.failed = jo.fd < 0 ? errno : 0;
    j_fmt("{\"shim_pid\":%d,\"shim_start\":%lld,\"pod\":", (int)g.self, g.start_time);
    j_str(g.pod);
    j_raw(",\"uid\":");
    j_str(g.uid);
    j_raw(",\"state\":");
    j_str(PSTATE[g.state]);
    if (g.driver) {
        j_raw(",\"driver\":");
        j_raw(g.driver);
    }
    if (g.cgroups_left)
        j_raw(",\"cgroups_left\":true");
    j_raw(",\"updated_at\":");
    j_time(now_wall());
    j_raw(",\"containers\":[");
    for (int i = 0; i < g.nctrs; i++) {
        if (i)
            j_raw(",");
        j_container(&g.ctrs[i]);
    }
    j_raw("]}");
    j_flush();
    int failed = jo.failed;
    if (jo.fd >= 0 && close(jo.fd) < 0 && !failed)
        failed = errno;
    jo.fd = 2;
    if (!failed && rename(g.status_tmp, g.status_path) < 0)
        failed = errno;
    g.dirty = 0;
    if (failed) {
        log_event("ERROR", "cannot write status", "error", strerror(failed), NULL);
        return;
    }
    notify();
}

/* ---- logs: byte for byte what common/rotlog.RotatingWriter writes -------------------------- */

/* The time index (format: common/logindex.py): a header naming the log's inode, then a record
 * (offset, wall ns) written before each chunk, at most one per LOG_TIMES_GAP ns. Little-endian. */
#define LOG_TIMES_GAP 1000000LL

static void put_le64(unsigned char *p, unsigned long long v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void times_close(struct ctr *c, int failed) {
    if (c->timesfd < 0)
        return;
    if (failed && ftruncate(c->timesfd, 0) < 0) {
        /* an emptied index means unknown times: better than wrong ones; nothing more to do */
    }
    close(c->timesfd);
    c->timesfd = -1;
}

static void times_open(struct ctr *c, const struct stat *log) {
    char path[PATH_BUF + 8];
    unsigned char want[16], have[16];
    snprintf(path, sizeof path, "%s.times", c->log_path);
    c->times_last = -1;
    c->timesfd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (c->timesfd < 0)
        return;
    memcpy(want, "RKLTIME1", 8);
    put_le64(want + 8, (unsigned long long)log->st_ino);
    if (pread(c->timesfd, have, 16, 0) == 16 && memcmp(have, want, 16) == 0)
        return;
    if (ftruncate(c->timesfd, 0) < 0 || write_all(c->timesfd, (const char *)want, 16) < 0)
        times_close(c, 1);
}

static void times_note(struct ctr *c, long long now_ns) {
    unsigned char rec[16];
    if (c->timesfd < 0 || (c->times_last >= 0 && now_ns - c->times_last < LOG_TIMES_GAP))
        return;
    put_le64(rec, (unsigned long long)c->log_size);
    put_le64(rec + 8, (unsigned long long)now_ns);
    if (write(c->timesfd, rec, 16) != 16)
        times_close(c, 1);
    else
        c->times_last = now_ns;
}

static int log_open(struct ctr *c) {
    struct stat st;
    c->logfd = open(c->log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (c->logfd < 0 || fstat(c->logfd, &st) < 0)
        return -1;
    c->log_size = st.st_size;
    times_open(c, &st);
    return 0;
}

/* Rename a log's index after its log (a reader pairs them by inode, never by name alone); with
 * no index to move, none may stay under the new name. */
static void times_rename(const char *older, const char *newer) {
    char from[PATH_BUF + 8], to[PATH_BUF + 8];
    snprintf(from, sizeof from, "%s.times", older);
    snprintf(to, sizeof to, "%s.times", newer);
    if (rename(from, to) < 0 && errno == ENOENT)
        unlink(to);
}

static int log_rotate(struct ctr *c) {
    char older[PATH_BUF], newer[PATH_BUF];
    if (c->logfd >= 0)
        close(c->logfd);
    c->logfd = -1;
    times_close(c, 0);
    if (g.log_files == 1) {
        if (unlink(c->log_path) < 0)
            return -1;
        char times[PATH_BUF + 8];
        snprintf(times, sizeof times, "%s.times", c->log_path);
        unlink(times);
    }
    for (long long i = g.log_files - 1; i > 0; i--) {
        if (i > 1)
            snprintf(older, sizeof older, "%s.%lld", c->log_path, i - 1);
        else
            snprintf(older, sizeof older, "%s", c->log_path);
        snprintf(newer, sizeof newer, "%s.%lld", c->log_path, i);
        if (access(older, F_OK) == 0) {
            if (rename(older, newer) < 0)
                return -1; /* the rename replaces, so drops, the oldest */
            times_rename(older, newer);
        }
    }
    return log_open(c);
}

static int log_put(struct ctr *c, const char *p, long long n, long long now_ns) {
    if (n <= 0)
        return 0;
    if (c->logfd < 0) {
        errno = EBADF;
        return -1;
    }
    times_note(c, now_ns);
    if (write_all(c->logfd, p, (size_t)n) < 0)
        return -1;
    c->log_size += n;
    return 0;
}

/* Rotation falls after the last newline that fits, or before a line that does not fit; a line
 * longer than a whole file is cut. The index arithmetic follows Python's rfind(sub, start, end),
 * negative end included, so that both writers cut a stream at the same places. */
static int log_write(struct ctr *c, const char *data, long long len) {
    long long start = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long now_ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    while (len - start > g.log_max - c->log_size) {
        long long lim = start + g.log_max - c->log_size, end = 0;
        if (lim < 0)
            lim = lim + len < 0 ? 0 : lim + len;
        long long hi = lim < len ? lim : len;
        const char *nl = hi > start ? memrchr(data + start, '\n', (size_t)(hi - start)) : NULL;
        if (nl)
            end = nl - data + 1;
        if (end == 0 && c->log_size == 0)
            end = start + g.log_max;
        if (end > start && log_put(c, data + start, end - start, now_ns) < 0)
            return -1;
        start = start > end ? start : end;
        if (log_rotate(c) < 0)
            return -1;
    }
    return log_put(c, data + start, len - start, now_ns);
}

/* ---- output pipes -------------------------------------------------------------------------- */

static void close_pipe(int fd, struct ctr *c) {
    epoll_ctl(g.epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    if (c->out == fd)
        c->out = -1; /* the number may soon name another pipe */
}

/* Copy output to the log; 1 while more may be waiting, 0 at EOF (then closed) or when empty. */
static int pump(int fd, struct ctr *c) {
    for (int i = 0; i < READS_PER_TURN; i++) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 0;
        if (n <= 0) {
            close_pipe(fd, c);
            return 0;
        }
        if (log_write(c, chunk, n) < 0 && !c->log_broken) {
            c->log_broken = 1; /* said once: a full disk would otherwise flood shim.log */
            log_event("ERROR", "container log lost", "container", c->name, "error", strerror(errno), NULL);
        }
    }
    return 1;
}

static uint64_t pipe_tag(struct ctr *c, int fd) {
    return ((uint64_t)(c - g.ctrs) << 32) | (uint32_t)fd;
}

/* ---- cgroups ------------------------------------------------------------------------------- */

static long long read_oom(struct ctr *c) {
    char buf[4096];
    if (!c->oom_file || read_small(c->oom_file, buf, sizeof buf) < 0)
        return -1;
    size_t klen = strlen(c->oom_key);
    for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (!strncmp(line, c->oom_key, klen) && line[klen] == ' ')
            return strtoll(line + klen + 1, NULL, 10);
    return 0;
}

/* SIGKILL every member of dir and of the groups under it. */
static void kill_members(const char *dir, int depth) {
    char path[PATH_BUF], buf[4096];
    snprintf(path, sizeof path, "%s/cgroup.kill", dir);
    if (depth == 0 && write_file(path, "1") == 0)
        return; /* v2: the kernel kills the whole subtree at once */
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        size_t carry = 0;
        ssize_t n;
        while ((n = read(fd, buf + carry, sizeof buf - 1 - carry)) > 0) {
            buf[carry + (size_t)n] = 0;
            char *p = buf, *nl;
            while ((nl = strchr(p, '\n'))) {
                pid_t pid = (pid_t)atoi(p);
                if (pid > 0)
                    kill(pid, SIGKILL);
                p = nl + 1;
            }
            carry = strlen(p);
            memmove(buf, p, carry);
        }
        close(fd);
    }
    DIR *d = depth < 8 ? opendir(dir) : NULL;
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_type == DT_DIR && e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            kill_members(path, depth + 1);
        }
    if (d)
        closedir(d);
}

/* Whether dir or a group under it has a member. */
static int populated(const char *dir, int depth) {
    char path[PATH_BUF], buf[16];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    if (read_small(path, buf, sizeof buf) != 0)
        return 1; /* a member, or unreadable: assume the worst */
    int found = 0;
    DIR *d = depth < 8 ? opendir(dir) : NULL;
    for (struct dirent *e; d && !found && (e = readdir(d));)
        if (e->d_type == DT_DIR && e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            found = populated(path, depth + 1);
        }
    if (d)
        closedir(d);
    return found;
}

static void kill_cgroup(struct ctr *c) {
    if (!c->ndirs)
        return;
    /* Only a member can add one (by forking): a group with none stays empty, and freezing it
     * would cost the kernel a system-wide code patch for nothing. */
    int busy = 0;
    for (int i = 0; i < c->ndirs && !busy; i++)
        busy = populated(c->dirs[i], 0);
    if (!busy)
        return;
    /* frozen (v1), a process forking in a loop cannot create children the sweep would miss */
    int frozen = c->freezer && write_file(c->freezer, "FROZEN") == 0;
    for (int waited = 0; frozen && waited < 1000; waited += 5) {
        char state[64];
        if (read_small(c->freezer, state, sizeof state) < 0 || !strncmp(state, "FROZEN", 6))
            break;
        sleep_ms(5); /* v1 offers no event for "frozen" */
    }
    for (int i = 0; i < c->ndirs; i++)
        kill_members(c->dirs[i], 0);
    if (frozen)
        write_file(c->freezer, "THAWED");
}

/* rmdir a group and the groups under it; a group stays busy a moment after its last task is
 * reaped, so EBUSY is retried for up to a second. -1 when one is left. */
static int remove_cgroup(const char *dir) {
    int left = 0;
    char path[PATH_BUF];
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_type == DT_DIR && e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            left |= remove_cgroup(path);
        }
    if (d)
        closedir(d);
    for (int waited = 0; rmdir(dir) < 0 && errno != ENOENT; waited += 20) {
        if (errno != EBUSY || waited >= 1000) {
            log_event("WARNING", "removing cgroups failed", "cgroup", dir, "error", strerror(errno), NULL);
            return -1;
        }
        sleep_ms(20);
    }
    return left;
}

/* ---- descendants --------------------------------------------------------------------------- */

/* SIGKILL every descendant of pid: without cgroups, a process that left its group is still the
 * shim's descendant (children files of /proc, one per thread). */
static void kill_descendants(pid_t pid, int depth) {
    char path[96], buf[512];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/%d/task/%.16s/children", (int)pid, e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        size_t carry = 0;
        ssize_t n;
        while (fd >= 0 && (n = read(fd, buf + carry, sizeof buf - 1 - carry)) > 0) {
            buf[carry + (size_t)n] = 0;
            char *p = buf, *sp;
            while ((sp = strchr(p, ' '))) {
                pid_t child = (pid_t)atoi(p);
                if (child > 0) {
                    kill(child, SIGKILL);
                    if (depth < 64)
                        kill_descendants(child, depth + 1);
                }
                p = sp + 1;
            }
            carry = strlen(p);
            memmove(buf, p, carry);
        }
        if (fd >= 0)
            close(fd);
    }
    if (d)
        closedir(d);
}

/* Without CONFIG_PROC_CHILDREN: the shim's direct children, from every process's stat; deeper
 * ones are re-parented to the shim (a subreaper) when their parent dies, and met next sweep. */
static void kill_children_by_scan(void) {
    char path[64], buf[512];
    DIR *d = opendir("/proc");
    for (struct dirent *e; d && (e = readdir(d));) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/%.20s/stat", e->d_name);
        char *p = read_small(path, buf, sizeof buf) > 0 ? strrchr(buf, ')') : NULL;
        int ppid;
        if (p && sscanf(p + 1, " %*c %d", &ppid) == 1 && ppid == (int)g.self)
            kill((pid_t)atoi(e->d_name), SIGKILL);
    }
    if (d)
        closedir(d);
}

/* ---- running a container ------------------------------------------------------------------- */

/* os.execvpe's search: the first error other than ENOENT/ENOTDIR wins, else the last one. */
static void exec_search(char **argv, char **envp) {
    const char *file = argv[0], *path = "/bin:/usr/bin";
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return;
    }
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5)) {
            path = *e + 5;
            break;
        }
    int saved = 0, last = ENOENT;
    char full[PATH_BUF];
    for (const char *p = path;; p++) {
        const char *colon = strchrnul(p, ':');
        int n = (int)(colon - p);
        if (n)
            snprintf(full, sizeof full, "%.*s%s%s", n, p, p[n - 1] == '/' ? "" : "/", file);
        else
            snprintf(full, sizeof full, "%s", file);
        execve(full, argv, envp);
        last = errno;
        if (errno != ENOENT && errno != ENOTDIR && !saved)
            saved = errno;
        if (!*colon)
            break;
        p = colon;
    }
    errno = saved ? saved : last;
}

/* The container's volumes, bind-mounted in a mount namespace of its own (a copy of the pod's,
 * which is private: nothing propagates to the node), before it changes user. */
static int mount_volumes(struct ctr *c, char *stage, size_t size) {
    snprintf(stage, size, "volume mounts: the pod has no private mount namespace (see shim.log)");
    if (!g.private_ns)
        return errno = EPERM, -1; /* a copy of the node's shared mounts would propagate back */
    snprintf(stage, size, "volume mounts: unshare(CLONE_NEWNS)");
    if (unshare(CLONE_NEWNS) < 0)
        return -1;
    for (int i = 0; i < c->nmounts; i++) {
        snprintf(stage, size, "volume mount %s on %s", c->mnt_src[i], c->mnt_dst[i]);
        if (mount(c->mnt_src[i], c->mnt_dst[i], NULL, MS_BIND | MS_REC, NULL) < 0)
            return -1;
        if (!strcmp(c->mnt_ro[i], "1") &&
            mount(NULL, c->mnt_dst[i], NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL) < 0)
            return -1;
    }
    snprintf(stage, size, "prctl(PR_SET_NO_NEW_PRIVS)");
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

static void exec_child(struct ctr *c, int out, int go, int err) {
    char stage[PATH_BUF], ok;
    snprintf(stage, sizeof stage, "%s", c->argv[0]);
    if (read(go, &ok, 1) != 1 || ok != 'g')
        _exit(1); /* the shim gave up on this start */
    setpgid(0, 0);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL); /* an ignored signal would stay ignored across exec */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC); /* dup2 makes fd 0 inheritable */
    if (null < 0 || dup2(null, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0)
        goto fail;
    if (c->has_user && getuid() == 0 && (c->uid != 0 || c->gid != 0)) {
        snprintf(stage, sizeof stage, "user %u:%u", (unsigned)c->uid, (unsigned)c->gid);
        if (setgroups(0, NULL) < 0 || setgid(c->gid) < 0 || setuid(c->uid) < 0)
            goto fail;
    }
    if (c->nmounts && mount_volumes(c, stage, sizeof stage) < 0)
        goto fail;
    if (c->cwd && *c->cwd) {
        snprintf(stage, sizeof stage, "working_dir %s", c->cwd);
        if (chdir(c->cwd) < 0)
            goto fail;
    }
    snprintf(stage, sizeof stage, "%s", c->argv[0]);
    exec_search(c->argv, c->envp);
fail:;
    int code = errno == ENOENT ? 127 : 126;
    dprintf(err, "%d %s: %s", code, stage, strerror(errno));
    _exit(code);
}

static void set_term(struct term *t, int has_code, int code, int sig, int reason, const char *msg) {
    t->has_code = has_code, t->code = code, t->sig = sig, t->reason = reason;
    t->has_msg = msg != NULL;
    snprintf(t->msg, sizeof t->msg, "%s", msg ? msg : "");
}

static int should_restart(const struct ctr *c, const struct term *end) {
    if (end->reason == CGROUPS_UNAVAILABLE)
        return 0; /* a retry would meet the same machine */
    if (c->policy == ON_FAILURE)
        return !end->has_code || end->code != 0;
    return c->policy == ALWAYS;
}

static void ended(struct ctr *c, const struct term *end) {
    c->state = TERMINATED;
    c->end = c->last = *end;
    c->has_end = c->has_last = 1;
    c->pid = 0;
    c->pid_start = -1;
    c->last_started = c->started_at;
    c->finished_at = now_wall();
    if (g.state == POD_RUNNING && should_restart(c, end)) {
        double ran_for = now_mono() - c->started_mono;
        c->delay = c->delay < 0 || ran_for >= g.bo_reset ? g.bo_initial
                 : c->delay * 2 < g.bo_max ? c->delay * 2 : g.bo_max;
        c->restart_due = now_mono() + c->delay;
        c->next_restart_at = c->finished_at + c->delay;
        c->state = WAITING; /* end stays: a back-off shows why it is waiting */
    }
    log_event("INFO", "container ended", "container", c->name, "reason", REASON[end->reason], NULL);
    g.dirty = 1;
}

/* How a run ended, from its wait status and whether its memory cgroup counted an OOM kill. */
static void classify(struct term *end, int status, int oom_killed) {
    if (!WIFSIGNALED(status)) {
        int code = WEXITSTATUS(status);
        set_term(end, 1, code, 0, code == 0 ? COMPLETED : ERROR, NULL);
        return;
    }
    int sig = WTERMSIG(status);
    char msg[64], name[16];
    if (sig == SIGKILL && oom_killed) {
        set_term(end, 1, 128 + sig, sig, OOM_KILLED, "killed for exceeding its memory limit");
        return;
    }
    snprintf(msg, sizeof msg, "killed by %s", sig_name(sig, name, sizeof name));
    set_term(end, 1, 128 + sig, sig, SIGNALED, msg);
}

static void exited(struct ctr *c, pid_t pid, int status) {
    struct term end;
    if (c->has_start_err) {
        end = c->start_err;
    } else {
        long long oom = read_oom(c);
        classify(&end, status, c->oom_before >= 0 && oom > c->oom_before);
    }
    if (c->out >= 0)
        pump(c->out, c); /* what it wrote before it died is in the pipe: logged before the exit */
    /* the container is over with its main process, as in a pid namespace: no leftovers */
    killpg(pid, SIGKILL);
    kill_cgroup(c);
    ended(c, &end);
}

static void start_failed(struct ctr *c, int code, const char *what, const char *detail) {
    char msg[MSG_MAX];
    snprintf(msg, sizeof msg, "%s: %s", what, detail);
    set_term(&c->start_err, 1, code, 0, START_ERROR, msg);
    c->has_start_err = 1;
}

/* Fork the workload into its own process group and cgroups, then exec it. The child waits for
 * a go byte until it is in every cgroup, so none of the workload runs outside its limits. */
static void launch(struct ctr *c) {
    int out[2], go[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0)
        return start_failed(c, 128, "pipe", strerror(errno));
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        start_failed(c, 128, "pipe", strerror(errno));
        close(out[0]), close(out[1]);
        return;
    }
    fcntl(out[1], F_SETPIPE_SZ, PIPE_SIZE); /* a bigger pipe only absorbs bursts */
    pid_t pid = fork();
    if (pid == 0) {
        close(out[0]), close(go[1]), close(err[0]);
        exec_child(c, out[1], go[0], err[1]);
    }
    close(out[1]), close(go[0]), close(err[1]);
    if (pid < 0) {
        start_failed(c, 128, "fork", strerror(errno));
        close(out[0]), close(go[1]), close(err[0]);
        return;
    }
    g.children = 1;
    c->pid = pid;
    c->out = out[0];
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = pipe_tag(c, out[0])};
    epoll_ctl(g.epfd, EPOLL_CTL_ADD, out[0], &ev);
    setpgid(pid, pid); /* the child does it too; whoever runs first, the group exists now */
    char pidstr[24], path[PATH_BUF];
    snprintf(pidstr, sizeof pidstr, "%d", (int)pid);
    for (int i = 0; i < c->ndirs; i++) {
        snprintf(path, sizeof path, "%s/cgroup.procs", c->dirs[i]);
        if (write_file(path, pidstr) < 0) {
            char what[PATH_BUF + 8];
            snprintf(what, sizeof what, "cgroup: %s", path);
            start_failed(c, 128, what, strerror(errno));
            break;
        }
    }
    if (!c->has_start_err && write_all(go[1], "g", 1) < 0)
        start_failed(c, 128, "start", strerror(errno));
    close(go[1]); /* without the go byte, the child exits at once */
    char report[MSG_MAX + 16];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof report - 1 && ((n = read(err[0], report + got, sizeof report - 1 - got)) > 0 ||
                                       (n < 0 && errno == EINTR)))
        got += n > 0 ? (size_t)n : 0;
    close(err[0]); /* EOF without a word: exec closed the pipe */
    report[got] = 0;
    c->pid_start = proc_start(pid);
    if (got && !c->has_start_err) {
        char *space = strchr(report, ' ');
        set_term(&c->start_err, 1, atoi(report), 0, START_ERROR, space ? space + 1 : report);
        c->has_start_err = 1;
    }
}

static void start(struct ctr *c) {
    c->restart_due = c->next_restart_at = -1;
    if (c->cg_error) {
        struct term t;
        set_term(&t, 0, 0, 0, CGROUPS_UNAVAILABLE, c->cg_error);
        ended(c, &t);
        return;
    }
    c->starts++;
    c->started_mono = now_mono();
    c->started_at = -1;
    c->has_start_err = 0;
    c->oom_before = read_oom(c);
    launch(c);
    if (!c->has_start_err) {
        c->state = RUNNING, c->has_end = 0, c->started_at = now_wall();
        g.dirty = 1;
        return;
    }
    int status = 0;
    if (c->pid) /* the child is exiting: reap it now, so the first status shows the failure */
        while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
        }
    if (c->pid)
        exited(c, c->pid, status);
    else
        ended(c, &c->start_err);
}

/* ---- stopping ------------------------------------------------------------------------------ */

static void begin_stop(void) {
    char grace[32];
    snprintf(grace, sizeof grace, "%g", g.grace);
    log_event("INFO", "stopping pod", "pod", g.pod, "grace", grace, NULL);
    g.state = POD_STOPPING;
    for (int i = 0; i < g.nctrs; i++) {
        struct ctr *c = &g.ctrs[i];
        c->restart_due = c->next_restart_at = -1;
        if (c->pid)
            killpg(c->pid, SIGTERM);
        else if (c->state == WAITING && c->has_end)
            c->state = TERMINATED;
    }
    g.kill_at = now_mono() + g.grace;
    g.quiet_until = now_mono() + STOPPING_QUIET;
    g.dirty = 1;
}

static void kill_everything(void) {
    for (int i = 0; i < g.nctrs; i++) {
        if (g.ctrs[i].pid)
            killpg(g.ctrs[i].pid, SIGKILL);
        kill_cgroup(&g.ctrs[i]);
    }
    char children[64];
    snprintf(children, sizeof children, "/proc/%d/task/%d/children", (int)g.self, (int)g.self);
    if (access(children, R_OK) == 0)
        kill_descendants(g.self, 0);
    else
        kill_children_by_scan();
}

static void finish(void) {
    for (int i = 0; i < g.nctrs; i++) {
        struct ctr *c = &g.ctrs[i];
        /* output still in the pipes is logged; a writer outside the pod holding one is left */
        for (int rounds = 0; c->out >= 0 && pump(c->out, c) && rounds < 64; rounds++) {
        }
        if (c->out >= 0)
            close_pipe(c->out, c);
        if (c->logfd >= 0)
            close(c->logfd);
        c->logfd = -1;
        times_close(c, 0);
    }
    for (int i = 0; i < g.nctrs; i++)
        for (int k = 0; k < g.ctrs[i].ndirs; k++)
            g.cgroups_left |= remove_cgroup(g.ctrs[i].dirs[k]) < 0;
    for (int k = 0; k < g.npod_dirs; k++)
        g.cgroups_left |= remove_cgroup(g.pod_dirs[k]) < 0;
    g.state = POD_EXITED;
    write_status();
    log_event("INFO", "pod stopped", "pod", g.pod, NULL);
}

/* ---- the event loop ------------------------------------------------------------------------ */

static int timeout_ms(void) {
    double due = g.kill_at;
    if (g.dirty && g.quiet_until >= 0 && (due < 0 || g.quiet_until < due))
        due = g.quiet_until;
    for (int i = 0; i < g.nctrs; i++)
        if (g.ctrs[i].restart_due >= 0 && (due < 0 || g.ctrs[i].restart_due < due))
            due = g.ctrs[i].restart_due;
    if (due < 0)
        return -1;
    double ms = (due - now_mono()) * 1000;
    if (ms <= 0)
        return 0;
    return ms > 3600000 ? 3600000 : (int)ms + ((int)ms < ms); /* rounded up: never early */
}

static void read_signals(void) {
    struct signalfd_siginfo si;
    while (read(g.sigfd, &si, sizeof si) == sizeof si)
        if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
            g.stop_asked = 1;
}

static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0 && errno == ECHILD)
            g.children = 0;
        if (pid <= 0)
            return;
        for (int i = 0; i < g.nctrs; i++)
            if (g.ctrs[i].pid == pid) {
                exited(&g.ctrs[i], pid, status);
                break;
            }
    }
}

static void turn(void) {
    struct epoll_event ev[16];
    int n = epoll_wait(g.epfd, ev, 16, timeout_ms());
    for (int i = 0; i < n; i++) {
        if (ev[i].data.u64 == UINT64_MAX)
            read_signals();
        else
            pump((int)(uint32_t)ev[i].data.u64, &g.ctrs[ev[i].data.u64 >> 32]);
    }
    if (g.state == POD_RUNNING && g.stop_asked)
        begin_stop();
    g.stop_asked = 0;
    reap();
    double now = now_mono();
    for (int i = 0; i < g.nctrs; i++)
        if (g.ctrs[i].restart_due >= 0 && g.ctrs[i].restart_due <= now)
            start(&g.ctrs[i]);
    if (g.kill_at >= 0 && g.kill_at <= now) {
        g.kill_at = now + KILL_SWEEP;
        kill_everything();
    }
    if (g.dirty && (g.quiet_until < 0 || g.quiet_until <= now))
        write_status();
}

/* ---- setting up ---------------------------------------------------------------------------- */

/* The pod's own /dev/shm in a mount namespace of its own, as large as its memory limits (tmpfs
 * pages count against the writer's memory cgroup anyway): what a pod leaves there goes away
 * with it. Without one (not root), the host's, and a warning. */
static void private_shm(void) {
    char options[64];
    const char *what = "unshare(CLONE_NEWNS)";
    snprintf(options, sizeof options, g.shm_size > 0 ? "mode=1777,size=%lld" : "mode=1777", g.shm_size);
    if (unshare(CLONE_NEWNS) == 0) {
        /* private first: otherwise the tmpfs would propagate back to the host's /dev/shm */
        what = "mount --make-rprivate /";
        if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0) {
            what = "mount tmpfs on /dev/shm";
            g.private_ns = 1; /* what volumes need: nothing mounted here reaches the node */
            if (mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, options) == 0)
                return;
        }
    }
    char error[256];
    snprintf(error, sizeof error, "%s: %s", what, strerror(errno));
    log_event("WARNING", "no private /dev/shm: the pod shares the host's", "error", error, NULL);
}

/* Memory emptyDirs: a tmpfs on each directory, in the pod's private mount namespace only, so
 * that every container sees the same one and it is gone with the shim. */
static const char *mount_tmpfs(void) {
    static char error[PATH_BUF + 128];
    for (int i = 0; i < g.ntmpfs; i++) {
        char options[64];
        long long size = atoll(g.tmpfs_size[i]);
        snprintf(options, sizeof options, size > 0 ? "mode=1777,size=%lld" : "mode=1777", size);
        if (!g.private_ns)
            return snprintf(error, sizeof error, "emptyDir %s (medium Memory): no private mount "
                            "namespace for its tmpfs", g.tmpfs[i]), error;
        if (mount("tmpfs", g.tmpfs[i], "tmpfs", MS_NOSUID | MS_NODEV, options) < 0)
            return snprintf(error, sizeof error, "emptyDir %s (medium Memory): mount tmpfs: %s",
                            g.tmpfs[i], strerror(errno)), error;
    }
    return NULL;
}

static const char *setup(void) {
    static char error[128];
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN); /* a closed pipe is an error to handle, not a reason to die */
    signal(SIGXFSZ, SIG_IGN);
    g.self = getpid();
    g.start_time = proc_start(g.self);
    g.kill_at = g.quiet_until = -1;
    g.notify_fd = -1;
    snprintf(g.status_path, sizeof g.status_path, "%s/status.json", g.dir);
    snprintf(g.status_tmp, sizeof g.status_tmp, "%s/status.json.%d.tmp", g.dir, (int)g.self);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        return snprintf(error, sizeof error, "prctl(PR_SET_CHILD_SUBREAPER): %s", strerror(errno)), error;
    g.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    g.epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    if (g.sigfd < 0 || g.epfd < 0 || epoll_ctl(g.epfd, EPOLL_CTL_ADD, g.sigfd, &ev) < 0)
        return snprintf(error, sizeof error, "signalfd/epoll: %s", strerror(errno)), error;
    if (g.notify)
        g.notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    private_shm();
    const char *tmpfs_error = mount_tmpfs();
    if (tmpfs_error)
        return tmpfs_error;
    for (int i = 0; i < g.nctrs; i++)
        if (log_open(&g.ctrs[i]) < 0) {
            g.ctrs[i].log_broken = 1;
            log_event("ERROR", "container log lost", "container", g.ctrs[i].name, "error", strerror(errno),
                      NULL);
        }
    return NULL;
}

/* Tell the spawner that every container has started once; if it is gone, it has reported a
 * failure to its caller, and a pod the caller believes failed must not stay. */
static void ready(void) {
    if (write_all(g.ready_fd, "ok", 2) < 0) {
        log_event("WARNING", "the spawner is gone: stopping the pod", "pod", g.pod, NULL);
        g.stop_asked = 1;
    }
    close(g.ready_fd);
}

static int run_shim(void) {
    const char *error = setup();
    if (error) {
        log_event("ERROR", "shim failed", "error", error, NULL);
        write_all(g.ready_fd, error, strlen(error));
        return 1;
    }
    g.state = POD_RUNNING;
    char pid[24];
    snprintf(pid, sizeof pid, "%d", (int)g.self);
    log_event("INFO", "shim started", "pod", g.pod, "pid", pid, NULL);
    for (int i = 0; i < g.nctrs; i++)
        start(&g.ctrs[i]);
    write_status();
    ready();
    while (g.state == POD_RUNNING || g.children)
        turn();
    finish();
    return 0;
}

/* The spawner: waits for the shim's word, then reports its pid (or why it failed) and exits. */
static int await_shim(pid_t pid, int fd) {
    char word[512];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof word - 1 && ((n = read(fd, word + got, sizeof word - 1 - got)) > 0 ||
                                     (n < 0 && errno == EINTR)))
        got += n > 0 ? (size_t)n : 0;
    word[got] = 0;
    if (got == 2 && !strcmp(word, "ok")) {
        printf("%d\n", (int)pid);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    fprintf(stderr, "riklet-shim: %s\n", got ? word : "the shim exited at start (see shim.log)");
    return 1;
}

/* The shim proper, in the child of a fork: its own session, stdin and stdout on /dev/null,
 * stderr to POD_DIR/shim.log; ready_fd gets "ok" or why it failed. */
static int become_shim(int ready_fd, int log_fd) {
    g.ready_fd = ready_fd;
    setsid(); /* its own session: no signal to the spawner's group reaches the pod */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(log_fd, 2) < 0)
        return 1;
    close(null);
    close(log_fd);
    return run_shim();
}

static int open_log(void) {
    char log_path[PATH_BUF];
    snprintf(log_path, sizeof log_path, "%s/shim.log", g.dir);
    return open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

/* A forked child of the server: the request's spec on spec_fd, its answer to answer_fd. */
static int serve_one(const char *dir, int spec_fd, int answer_fd) {
    char error[PATH_BUF + 64];
    signal(SIGCHLD, SIG_DFL); /* the server's SIG_IGN would reap the containers behind its back */
    g.dir = dir;
    if (dup2(spec_fd, 0) < 0 || (spec_fd != 0 && close(spec_fd) < 0))
        return 1;
    if (load_spec() < 0) {
        snprintf(error, sizeof error, "bad spec: %s", spec_error);
        write_all(answer_fd, error, strlen(error));
        return 2;
    }
    int log_fd = open_log();
    if (log_fd < 0) {
        snprintf(error, sizeof error, "%s/shim.log: %s", dir, strerror(errno));
        write_all(answer_fd, error, strlen(error));
        return 1;
    }
    return become_shim(answer_fd, log_fd);
}

/* `riklet-shim --serve`: a fork-server on stdin, a SOCK_SEQPACKET socket. Each message is a
 * pod directory with two descriptors: the read end of a pipe carrying the spec, and the write
 * end of the pipe for the answer. Each request forks a shim; nothing is exec'd, so a pod's
 * holder costs a fork of this small process (copy-on-write) instead of a program start. The
 * server ends when the socket's other side closes; its shims, in sessions of their own, go on
 * (reparented to the nearest subreaper). */
static int serve(void) {
    signal(SIGCHLD, SIG_IGN); /* shims that end are reaped by the kernel: nobody waits for them */
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        char dir[PATH_BUF];
        union {
            struct cmsghdr h;
            char space[CMSG_SPACE(2 * sizeof(int))];
        } ctl;
        struct iovec iov = {.iov_base = dir, .iov_len = sizeof dir - 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.space,
                             .msg_controllen = sizeof ctl.space};
        ssize_t n = recvmsg(0, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n == 0 ? 0 : 1;
        dir[n] = 0;
        int fds[2] = {-1, -1}, nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int got = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < got; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                    if (nfds < 2)
                        fds[nfds++] = fd;
                    else
                        close(fd);
                }
            }
        if (nfds == 2 && dir[0] == '/' && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            pid_t pid = fork();
            if (pid == 0) {
                _exit(serve_one(dir, fds[0], fds[1]));
            }
            if (pid < 0) {
                char error[128];
                snprintf(error, sizeof error, "fork: %s", strerror(errno));
                write_all(fds[1], error, strlen(error));
            }
        } else if (nfds == 2) {
            const char *error = "the request is not an absolute pod directory";
            write_all(fds[1], error, strlen(error));
        }
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
    }
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "--serve"))
        return serve();
    if (argc != 2 || argv[1][0] != '/') {
        fprintf(stderr, "usage: riklet-shim POD_DIR < SPEC (POD_DIR an absolute path)\n"
                        "       riklet-shim --serve (stdin: a SOCK_SEQPACKET socket)\n");
        return 2;
    }
    g.dir = argv[1];
    if (load_spec() < 0) {
        fprintf(stderr, "riklet-shim: bad spec on stdin: %s\n", spec_error);
        return 2;
    }
    int word[2];
    int log_fd = open_log();
    if (log_fd < 0 || pipe2(word, O_CLOEXEC) < 0) {
        fprintf(stderr, "riklet-shim: %s/shim.log: %s\n", g.dir, strerror(errno));
        return 1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "riklet-shim: fork: %s\n", strerror(errno));
        return 1;
    }
    if (pid > 0) {
        close(word[1]);
        return await_shim(pid, word[0]);
    }
    close(word[0]);
    return become_shim(word[1], log_fd);
}
