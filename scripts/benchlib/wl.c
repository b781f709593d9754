/* Workloads for scripts/bench: tight loops in C, so that what is measured is
 * the kernel path (and the probes on it), not the Python interpreter.
 *
 *   wl send  SECONDS [SIZE]   one loopback TCP connection, SIZE-byte send()s
 *                             (default 64); a forked child drains the other end
 *   wl send1 SECONDS [SIZE]   the same, drained by the same thread (non-blocking
 *                             recv after every 64 sends): no second process,
 *                             for measuring per-syscall cost without scheduling noise
 *   wl syscall SECONDS        getppid() in a loop: the tax on every syscall
 *   wl churn SECONDS          connect, one 16-byte write, close; a forked child
 *                             accepts, reads, closes (server closes first, so
 *                             TIME_WAIT stays on the server side and the
 *                             client's ephemeral ports never run out)
 *   wl storm SECONDS          shutdown(SHUT_WR) on a connected socket, SIGPIPE
 *                             ignored, send() in a loop: every call fails EPIPE
 *
 * Protocol with the harness: after set-up the program prints
 *   READY <pid>
 * on stdout and blocks until one byte arrives on stdin (so a tracer can be
 * started with -p <pid> and be attached before the loop starts; untraced runs
 * are gated the same way). Then it runs for SECONDS (checked every 64
 * iterations, and never more than an absolute cap of 4 x SECONDS + 5 s, and
 * never more than 50 million iterations; SIGALRM ends the process after
 * 4 x SECONDS + 90 s whatever happens, and the forked peer dies with it) and
 * prints one JSON line:
 *   {"mode":"send","ops":N,"seconds":T,"epipe":E,"errors":X,"errno":LAST,
 *    "cpu_self":S,"cpu_children":C,"majflt":M,"nivcsw":V}
 * cpu_self is this process's user+system CPU time during the loop, cpu_children
 * that of the forked peer (drain / accept side), so ops per CPU-second can be
 * compared even when other processes compete for the CPUs; majflt and nivcsw
 * (major faults, involuntary switches during the loop) help explain stalls.
 * Only 127.0.0.1 is ever used.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITER 50000000L

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "wl: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int listener(struct sockaddr_in *addr)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(addr, 0, sizeof(*addr));
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr->sin_port = 0;
    if (bind(s, (struct sockaddr *)addr, sizeof(*addr)) < 0)
        die("bind");
    if (listen(s, 1024) < 0)
        die("listen");
    socklen_t len = sizeof(*addr);
    if (getsockname(s, (struct sockaddr *)addr, &len) < 0)
        die("getsockname");
    return s;
}

static int dial(const struct sockaddr_in *addr)
{
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0)
        return -1;
    if (connect(c, (const struct sockaddr *)addr, sizeof(*addr)) < 0) {
        int e = errno;
        close(c);
        errno = e;
        return -1;
    }
    return c;
}

static void gate(void)
{
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    char b;
    ssize_t n;
    do {
        n = read(0, &b, 1);
    } while (n < 0 && errno == EINTR);
    if (n != 1) {
        fprintf(stderr, "wl: no go byte on stdin; not running\n");
        exit(3);
    }
}

/* in a forked peer: die with the parent, and never outlive the hard cap */
static void child_guard(double seconds)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1)
        _exit(1);
    alarm((unsigned)(seconds * 4 + 60));
}

static void stop_child(pid_t child)
{
    if (child > 0) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    }
}

static double cpu_of(int who)
{
    struct rusage ru;
    if (getrusage(who, &ru) < 0)
        return 0;
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double cpu0;     /* RUSAGE_SELF when the loop started */
static long majflt0, nivcsw0;

static void ctx_counts(long *majflt, long *nivcsw)
{
    struct rusage ru;
    *majflt = *nivcsw = 0;
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        *majflt = ru.ru_majflt;
        *nivcsw = ru.ru_nivcsw;
    }
}

static void report(const char *mode, long ops, double secs, long epipe, long errors, int lasterr,
                   double cpu_self)
{
    /* the peer process has been reaped by now */
    long majflt, nivcsw;
    ctx_counts(&majflt, &nivcsw);
    printf("{\"mode\":\"%s\",\"ops\":%ld,\"seconds\":%.6f,\"epipe\":%ld,\"errors\":%ld,\"errno\":%d,"
           "\"cpu_self\":%.6f,\"cpu_children\":%.6f,\"majflt\":%ld,\"nivcsw\":%ld}\n",
           mode, ops, secs, epipe, errors, lasterr, cpu_self, cpu_of(RUSAGE_CHILDREN),
           majflt - majflt0, nivcsw - nivcsw0);
    fflush(stdout);
}

/* the harness kills us if we hang; this is the in-process cap */
static double hard_deadline(double t0, double seconds)
{
    return t0 + 4 * seconds + 5;
}

/* The measured loop's clock, the same for every workload: started after the
 * gate, checked after each batch, stopped (CPU taken) before any cleanup. */
struct run {
    double t0, end, cap, t, cpu_self;
};

static void run_start(struct run *r, double seconds)
{
    cpu0 = cpu_of(RUSAGE_SELF);
    ctx_counts(&majflt0, &nivcsw0);
    r->t0 = r->t = now();
    r->end = r->t0 + seconds;
    r->cap = hard_deadline(r->t0, seconds);
}

/* after a batch: time (or the iteration budget) is up */
static int run_over(struct run *r, long done, long budget)
{
    r->t = now();
    return r->t >= r->end || r->t >= r->cap || done >= budget;
}

static void run_stop(struct run *r)
{
    r->cpu_self = cpu_of(RUSAGE_SELF) - cpu0;
}

/* a listener, and a child process (0 returned in it, guarded by
 * child_guard) to serve it; the parent gets the child's pid */
static pid_t fork_server(int *l, struct sockaddr_in *addr, double seconds)
{
    *l = listener(addr);
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0)
        child_guard(seconds);
    return child;
}

/* a listener and both ends of one loopback connection, all in this process */
static void loopback_pair(int *l, int *c, int *s)
{
    struct sockaddr_in addr;
    *l = listener(&addr);
    *c = dial(&addr);
    if (*c < 0)
        die("connect");
    *s = accept(*l, NULL, NULL);
    if (*s < 0)
        die("accept");
}

/* the payload of the send workloads: size bytes (64 when out of range) */
static int fill_buffer(char *buf, int cap, int size)
{
    if (size < 1 || size > cap)
        size = 64;
    memset(buf, 'x', size);
    return size;
}

/* 64 send()s of size bytes, counted as ops or errors */
static void send_batch(int c, const char *buf, int size, int flags, long *ops, long *errors,
                       int *lasterr)
{
    for (int i = 0; i < 64; i++) {
        if (send(c, buf, size, flags) < 0) {
            (*errors)++;
            *lasterr = errno;
        } else {
            (*ops)++;
        }
    }
}

static int do_send(double seconds, int size)
{
    struct sockaddr_in addr;
    int l;
    pid_t child = fork_server(&l, &addr, seconds);
    if (child == 0) {
        /* drain: accept one connection, read until EOF (or killed) */
        int s = accept(l, NULL, NULL);
        if (s < 0)
            _exit(1);
        static char buf[1 << 16];
        for (;;) {
            ssize_t n = read(s, buf, sizeof(buf));
            if (n <= 0)
                _exit(0);
        }
    }
    close(l);
    int c = dial(&addr);
    if (c < 0)
        die("connect");
    char buf[65536];
    size = fill_buffer(buf, sizeof(buf), size);
    gate();
    long ops = 0, errors = 0;
    int lasterr = 0;
    struct run r;
    run_start(&r, seconds);
    do
        send_batch(c, buf, size, 0, &ops, &errors, &lasterr);
    while (!run_over(&r, ops + errors, MAX_ITER));
    run_stop(&r);
    close(c);
    stop_child(child);
    report("send", ops, r.t - r.t0, 0, errors, lasterr, r.cpu_self);
    return 0;
}

/* send1: the send path without a second process: the same thread drains the
 * receiving end (non-blocking) after every 64 sends, so no scheduling
 * interplay between sender and receiver blurs the per-syscall cost */
static int do_send1(double seconds, int size)
{
    int l, c, s;
    loopback_pair(&l, &c, &s);
    static char buf[65536], rbuf[1 << 18];
    size = fill_buffer(buf, sizeof(buf), size);
    gate();
    long ops = 0, errors = 0;
    int lasterr = 0;
    struct run r;
    run_start(&r, seconds);
    do {
        send_batch(c, buf, size, MSG_DONTWAIT, &ops, &errors, &lasterr);
        while (recv(s, rbuf, sizeof(rbuf), MSG_DONTWAIT) > 0)
            ;
    } while (!run_over(&r, ops + errors, MAX_ITER));
    run_stop(&r);
    close(c);
    close(s);
    close(l);
    report("send1", ops, r.t - r.t0, 0, errors, lasterr, r.cpu_self);
    return 0;
}

/* syscall: the cheapest syscall in a loop, to measure what the tracer adds to
 * every syscall of every process (raw_syscalls and syscalls:* tracepoints) */
static int do_syscall(double seconds)
{
    gate();
    long ops = 0;
    struct run r;
    run_start(&r, seconds);
    do {
        for (int i = 0; i < 256; i++)
            syscall(SYS_getppid);
        ops += 256;
    } while (!run_over(&r, ops, 20 * MAX_ITER));
    run_stop(&r);
    report("syscall", ops, r.t - r.t0, 0, 0, 0, r.cpu_self);
    return 0;
}

static int do_churn(double seconds)
{
    struct sockaddr_in addr;
    int l;
    pid_t child = fork_server(&l, &addr, seconds);
    if (child == 0) {
        char b[64];
        for (;;) {
            int s = accept(l, NULL, NULL);
            if (s < 0) {
                if (errno == EINTR || errno == ECONNABORTED)
                    continue;
                _exit(1);
            }
            (void)read(s, b, sizeof(b));
            close(s);      /* server closes first: TIME_WAIT lands here */
        }
    }
    char msg[16];
    memset(msg, 'c', sizeof(msg));
    gate();
    long ops = 0, errors = 0;
    int lasterr = 0;
    struct run r;
    run_start(&r, seconds);
    for (;;) {
        for (int i = 0; i < 16; i++) {
            int c = dial(&addr);
            if (c < 0) {
                errors++;
                lasterr = errno;
                continue;
            }
            char b[64];
            if (write(c, msg, sizeof(msg)) != (ssize_t)sizeof(msg)) {
                errors++;
                lasterr = errno;
            } else if (read(c, b, sizeof(b)) < 0) {   /* wait for the server's close */
                errors++;
                lasterr = errno;
            } else {
                ops++;
            }
            close(c);
        }
        if (run_over(&r, ops + errors, MAX_ITER))
            break;
        if (errors > 1000 && errors > ops)
            break;         /* something is wrong (ports exhausted?): stop early */
    }
    run_stop(&r);
    stop_child(child);
    close(l);
    report("churn", ops, r.t - r.t0, 0, errors, lasterr, r.cpu_self);
    return 0;
}

static int do_storm(double seconds)
{
    int l, c, s;
    loopback_pair(&l, &c, &s);
    signal(SIGPIPE, SIG_IGN);
    gate();
    /* after the gate, so a tracer sees our own shutdown() */
    if (shutdown(c, SHUT_WR) < 0)
        die("shutdown");
    char buf[1] = {'s'};
    long ops = 0, epipe = 0, errors = 0;
    int lasterr = 0;
    struct run r;
    run_start(&r, seconds);
    do {
        for (int i = 0; i < 64; i++) {
            ssize_t n = send(c, buf, 1, 0);
            ops++;
            if (n < 0) {
                if (errno == EPIPE)
                    epipe++;
                else {
                    errors++;
                    lasterr = errno;
                }
            }
        }
    } while (!run_over(&r, ops, MAX_ITER));
    run_stop(&r);
    close(c);
    close(s);
    close(l);
    report("storm", ops, r.t - r.t0, epipe, errors, lasterr, r.cpu_self);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: wl send|send1|churn|storm|syscall SECONDS [SIZE]\n");
        return 2;
    }
    double seconds = atof(argv[2]);
    if (!(seconds > 0 && seconds <= 120)) {
        fprintf(stderr, "wl: SECONDS must be in (0, 120]\n");
        return 2;
    }
    alarm((unsigned)(seconds * 4 + 90));   /* absolute cap, gate included */
    if (!strcmp(argv[1], "send"))
        return do_send(seconds, argc > 3 ? atoi(argv[3]) : 64);
    if (!strcmp(argv[1], "send1"))
        return do_send1(seconds, argc > 3 ? atoi(argv[3]) : 64);
    if (!strcmp(argv[1], "churn"))
        return do_churn(seconds);
    if (!strcmp(argv[1], "syscall"))
        return do_syscall(seconds);
    if (!strcmp(argv[1], "storm"))
        return do_storm(seconds);
    fprintf(stderr, "wl: unknown mode %s\n", argv[1]);
    return 2;
}
