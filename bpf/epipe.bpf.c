// SPDX-License-Identifier: GPL-2.0
/*
 * epipe-trace: the kernel side.
 *
 * Two jobs. (1) Keep a short history per socket (state changes, RST received
 * and the state it hit, the error the kernel reported, our own shutdown, when
 * it was accepted), fed from softirq as well as process context, so ownership
 * is never taken from whatever task happens to be on the CPU. (2) For every
 * send or write that fails with EPIPE/ECONNRESET, emit one event carrying that
 * history plus what the error-point hook and the SIGPIPE generation saw, and
 * count it in-kernel by the facts that decide its cause, so the summary stays
 * exact when the ring buffer drops events. Where that is reported (ep_report)
 * is the plan's choice: sock_sendmsg's return and SIGPIPE generation, which
 * hook no syscall, or the raw sys_exit.
 *
 * Which hook uses which mechanism is decided in Python (tracer/plan.py) and
 * passed in as -D macros:
 *   HOOK_STATE  1 kprobe tcp_set_state   2 fentry   3 tracepoint / 4 raw tracepoint sock:inet_sock_set_state
 *   HOOK_RST    1 kprobe tcp_reset       2 fentry   3 tracepoint tcp:tcp_receive_reset
 *   HOOK_SERR   1 kprobe sk_stream_error 2 fentry   4 raw tracepoint sock_send_length
 *   HOOK_EREP   4 raw tracepoint inet_sk_error_report
 *   HOOK_SIGGEN 3 tracepoint / 4 raw tracepoint signal:signal_generate
 *   HOOK_SIGDLV / HOOK_EXIT / HOOK_ACCEPT / HOOK_SHUT / HOOK_CLOSE  3 tracepoint
 *   HOOK_SYSEXIT 4 raw tracepoint sys_exit (a report point)
 *   REPORT_SENDLEN / REPORT_PIPE_SIG  1: sockets / pipes are reported at
 *               sock_send_length / signal_generate instead
 *   REPORT_KRET 1: sockets are reported where the failing kernel function
 *               returns (kretprobes; kernels without sock_send_length)
 *   HOOK_PIPE / HOOK_UNIX  1 kprobe on the pipe / UNIX write path; 0: nothing
 *               extra, the report point still sees those failures
 * A macro left at 0 compiles the hook out.
 * The same text compiles against real kernel headers and against the tree
 * generated from BTF (tracer/headers.py), which stubs these includes.
 */
#include <uapi/linux/ptrace.h>
#include <net/sock.h>
#include <net/inet_sock.h>
#include <linux/tcp.h>
#include <linux/sched.h>
#include <linux/fdtable.h>
#include <linux/fs.h>
#include <linux/pipe_fs_i.h>
#include <net/af_unix.h>

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* Read a kernel field explicitly: bcc's rewriter does not follow pointers
 * through helper functions or raw tracepoint arguments. */
#define KR(p, field) ({                                                \
        typeof((p)->field) __kr_v;                                     \
        __builtin_memset((void *)&__kr_v, 0, sizeof(__kr_v));          \
        bpf_probe_read_kernel((void *)&__kr_v, sizeof(__kr_v), (void *)&(p)->field); \
        __kr_v; })

/* network to host order; both supported architectures are little-endian,
 * and the generated header tree has no byteorder macros */
#define EP_NTOHS(x) ((u16)__builtin_bswap16((u16)(x)))

#define EP_EPIPE        32
#define EP_ECONNRESET   104
#define EP_SIGPIPE      13
#define EP_MSG_NOSIGNAL 0x4000
#define EP_S_IFMT       0170000
#define EP_S_IFSOCK     0140000
#define EP_S_IFIFO      0010000
#define EP_AF_UNIX      1
#define EP_AF_INET      2
#define EP_AF_INET6     10
#define EP_IPPROTO_TCP  6
#define EP_PIPEFS_MAGIC 0x50495045
#define EP_TCP_ESTABLISHED 1
#define EP_TCP_CLOSE_WAIT  8
#define EP_TCP_SYN_SENT    2
#define EP_TCP_SYN_RECV    3
#define EP_TCP_LISTEN      10
#define EP_TCP_FIN_WAIT1   4
#define EP_TCP_LAST_ACK    9
#define EP_SOCK_STREAM     1
#define EP_SOCK_SEQPACKET  5

#define KIND_OTHER 0
#define KIND_TCP   1
#define KIND_UNIX  2
#define KIND_PIPE  3
#define KIND_FIFO  4
#define KIND_SOCK  5

#define EV_FAIL    1
#define EV_DELIVER 2
#define EV_EXIT    3

#define PATH_NONE        0
#define PATH_STREAM_ERR  1   /* sk_stream_error() observed (kprobe/fentry) */
#define PATH_SEND_LENGTH 2   /* sock_sendmsg() returned the error (sock:sock_send_length) */
#define PATH_PIPE_WRITE  3   /* pipe_write() entered with no readers left (kprobe) */
#define PATH_UNIX_SEND   4   /* unix_stream_sendmsg() entered on a shut-down pair (kprobe) */

#define NSTATES 8

#ifndef NOSIG
#define NOSIG 0xff
#endif

struct state_rec {
    u64 ts;
    u8 oldstate;
    u8 newstate;
    u8 pad[6];
};

/* Everything we remember about one socket (TCP or UNIX), keyed by its address. */
struct sk_hist {
    u64 first_ts;
    u64 est_ts;          /* reached ESTABLISHED */
    u64 close_wait_ts;   /* reached CLOSE_WAIT: the peer's FIN */
    u64 accept_ts;       /* returned by accept() */
    u64 rst_ts;          /* RST received */
    u64 shut_ts;         /* our shutdown() */
    u64 err_ts;          /* error reported on the socket */
    u64 peer_close_ts;   /* UNIX: the peer closed its end */
    u32 accept_pid;
    u32 shut_pid;
    u32 peer_close_pid;
    s32 err_reported;    /* sk_err when the error was reported */
    s32 rst_sk_err;      /* sk_err before the RST was processed */
    u8 rst_state;        /* state the RST hit (0: no RST seen) */
    u8 shut_how;         /* how + 1 (0: no shutdown seen) */
    u8 nstates;          /* transitions seen; ring index = n % NSTATES */
    u8 family;
    u16 lport;
    u16 rport;
    u8 laddr[16];
    u8 raddr[16];
    char peer_close_comm[16];
    u8 hflags;           /* HF_* */
    u8 hpad[7];
    struct state_rec states[NSTATES];
};

#define HF_PASSIVE        1   /* a listener's child (its first state was SYN_RECV) */
#define HF_UNACCEPTED_FIN 2   /* the peer's FIN came while nobody had accepted it yet */
#define SHUT_FIN_SENT     4   /* shut_how: TCP, inferred from the FIN we sent while open */
#define SHUT_SEND_SIDE    5   /* shut_how: UNIX, our send side shut with the peer open */

/* What the error-point hook saw, waiting for the syscall exit. */
struct inflight {
    u64 ts;
    u64 sk;
    s32 err_at_hook;     /* err argument of sk_stream_error / ret of sock_sendmsg */
    s32 sk_err_at_hook;  /* sk->sk_err when the hook ran (before sock_error() consumed it) */
    u32 flags;
    u8 path;
    u8 shutdown_at_hook;  /* no sk_* names here: kernel headers #define sk_state */
    u8 state_at_hook;
    u8 pad;
    s32 kstack;
};

/* What the SIGPIPE generation saw, waiting for the syscall exit. */
struct sigrec {
    u64 ts;
    u64 handler;
    u8 result;           /* signal_generate result: 0 delivered, 1 ignored, 2 pending ... */
    u8 blocked;
    u8 pad[6];
};

/* Pipes: who read last and how that reader went away. */
struct pipe_reader {
    u64 ts;
    u32 pid;
    s32 exit_code;       /* -1: closed the fd, else the exit code (signal in low 7 bits) */
    u8 how;              /* 1 closed the fd, 2 exited */
    u8 pad[7];
    char comm[16];
};

/* The in-kernel counter key: exactly the facts explain.classify() uses. */
struct count_key {
    u8 kind;
    u8 rst_state;
    u8 shut_how;
    u8 accepted_after_close;
    u8 state_now;
    u8 nosignal;
    u8 sig_result;
    u8 sig_blocked;
    u8 sig_disp;         /* 0 SIG_DFL, 1 SIG_IGN, 2 handler */
    u8 family;
    u8 peer_gone;        /* UNIX/pipe: no peer / no readers */
    u8 has_hist;
    u16 rport;
    u16 pad;
    s32 err;             /* the syscall's return value */
    s32 err_reported;
    u8 raddr[16];
};

struct event {
    u8 type;
    u8 kind;
    u8 path;
    u8 sig_result;
    u8 sig_blocked;
    u8 sig_disp;
    u8 state_now;
    u8 sk_shutdown;
    u8 has_hist;
    u8 sock_type;
    u8 peer_gone;
    u8 peer_shutdown;
    u8 pipe_how;
    u8 shut_how;         /* the facts the counter key used, so events and */
    u8 accepted_after_close;   /* counts can never disagree */
    u8 pad;
    u32 pid;
    u32 tid;
    s32 ret;
    s32 fd;
    u32 syscall_nr;
    u32 flags;
    s32 err_at_hook;
    s32 sk_err_at_hook;
    s32 kstack;
    s32 ustack;
    u32 peer_pid;
    u32 pipe_readers;
    u32 pipe_writers;
    u32 pipe_reader_pid;
    s32 pipe_reader_exit;
    u32 ino;
    u64 ts;
    u64 sk;
    u64 sig_handler;
    u64 bytes_sent;
    u64 bytes_acked;
    u64 bytes_received;
    u64 pipe_reader_ts;
    u64 cgroup;
    char comm[16];
    char peer_comm[16];
    char name[64];       /* UNIX path (abstract: leading 0) or pipe/FIFO dentry name */
    struct sk_hist hist;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_TABLE("lru_hash", u64, struct sk_hist, hist, HIST_ENTRIES);
BPF_TABLE("lru_hash", u32, struct inflight, inflight, 4096);
BPF_TABLE("lru_hash", u32, struct sigrec, sigs, 4096);
BPF_TABLE("lru_hash", u64, struct pipe_reader, pipe_readers, 8192);
/* counts: exact, keyed by the facts alone (raddr/rport zero); counts_remote:
 * the same by remote endpoint too, best effort (it can fill up: stats[6]) */
BPF_HASH(counts, struct count_key, u64, 4096);
BPF_HASH(counts_remote, struct count_key, u64, COUNT_ENTRIES);
BPF_PERCPU_ARRAY(zero_hist, struct sk_hist, 1);
BPF_ARRAY(zero_event, struct event, 1);
/* stats: 0 events sent, 1 events lost (ring buffer full), 2 counter map full,
 *        3 failures seen, 4 SIGPIPE deaths, 5 history map insert failed */
BPF_PERCPU_ARRAY(stats, u64, 8);
#if FILTER_PID
BPF_HASH(target_pids, u32, u8, 1024);
#endif
#if FILTER_LPORT
BPF_HASH(lports, u16, u8, 64);
#endif
#if FILTER_DPORT
BPF_HASH(dports, u16, u8, 64);
#endif
#if WANT_STACKS
BPF_STACK_TRACE(stacks, 4096);
#endif

/* Ring buffer memory is not zeroed, and a memset of this size would become a
 * libcall the BPF target lacks: copy from a template that stays all zeros. */
static __always_inline void ep_event_zero(struct event *e)
{
    int z = 0;
    struct event *tpl = zero_event.lookup(&z);
    if (tpl)
        bpf_probe_read_kernel(e, sizeof(*e), tpl);
}

static __always_inline void ep_stat_inc(int i);

/* A zeroed ring-buffer record for the current task, or 0 (counted as lost). */
static __always_inline struct event *ep_event_new(u8 type)
{
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        ep_stat_inc(1);
        return 0;
    }
    ep_event_zero(e);
    u64 id = bpf_get_current_pid_tgid();
    e->type = type;
    e->ts = bpf_ktime_get_ns();
    e->pid = id >> 32;
    e->tid = (u32)id;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void ep_stat_inc(int i)
{
    u64 *v = stats.lookup(&i);
    if (v)
        (*v)++;
}

/* Process-context filters: -p, -c, --cgroup. Never used in softirq hooks. */
static __always_inline int ep_task_wanted(u32 pid)
{
#if FILTER_PID
    if (!target_pids.lookup(&pid))
        return 0;
#endif
#if FILTER_COMM
    char comm[16] = {};
    char want[16] = FILTER_COMM_STR;
    bpf_get_current_comm(&comm, sizeof(comm));
    #pragma unroll
    for (int i = 0; i < 16; i++) {
        if (comm[i] != want[i])
            return 0;
        if (comm[i] == 0)
            break;
    }
#endif
#if FILTER_CGROUP
    if (bpf_get_current_cgroup_id() != FILTER_CGROUP_ID)
        return 0;
#endif
    return 1;
}

static __always_inline struct sk_hist *ep_hist_get_fresh(struct sock *sk, u8 *fresh)
{
    u64 key = (u64)sk;
    struct sk_hist *h = hist.lookup(&key);
    *fresh = 0;
    if (h)
        return h;
    *fresh = 1;
    int z = 0;
    struct sk_hist *zero = zero_hist.lookup(&z);
    if (!zero)
        return 0;
    h = hist.lookup_or_try_init(&key, zero);
    if (!h) {
        ep_stat_inc(5);
        return 0;
    }
    h->first_ts = bpf_ktime_get_ns();
    return h;
}

static __always_inline struct sk_hist *ep_hist_get(struct sock *sk)
{
    u8 fresh;
    return ep_hist_get_fresh(sk, &fresh);
}

static __always_inline void ep_read_tuple(struct sock *sk, struct sk_hist *h)
{
    u16 family = KR(sk, __sk_common.skc_family);
    u16 lport = KR(sk, __sk_common.skc_num);
    u16 dport_be = KR(sk, __sk_common.skc_dport);
    if (lport == 0)
        return;     /* unhashed (port released at close): keep what we had */
    h->family = family;
    h->lport = lport;
    h->rport = EP_NTOHS(dport_be);
    if (family == EP_AF_INET) {
        u32 s = KR(sk, __sk_common.skc_rcv_saddr);
        u32 d = KR(sk, __sk_common.skc_daddr);
        __builtin_memcpy(h->laddr, &s, 4);
        __builtin_memcpy(h->raddr, &d, 4);
    } else if (family == EP_AF_INET6) {
        bpf_probe_read_kernel(h->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
        bpf_probe_read_kernel(h->raddr, 16, &sk->__sk_common.skc_v6_daddr);
    }
}

/* ---- hook bodies, shared by every mechanism ------------------------------ */
/* (every helper is ep_-prefixed: kernel headers define fd_file() and others
 * as macros in some versions) */

static __always_inline void ep_on_state(struct sock *sk, int oldstate, int newstate)
{
    u16 family = KR(sk, __sk_common.skc_family);
#if FILTER_FAMILY
    if (family != FILTER_FAMILY)
        return;
#endif
    u8 fresh;
    struct sk_hist *h = ep_hist_get_fresh(sk, &fresh);
    if (!h)
        return;
    u64 now = bpf_ktime_get_ns();
    u8 n = h->nstates;
    /* Sockets are keyed by address and freed sockets' memory is reused: a
     * history whose last state is not this change's old state, or a change
     * that starts a socket's life, belongs to a previous socket. Start over. */
    u8 last = n ? h->states[(n - 1) & (NSTATES - 1)].newstate : 0;
    if (!fresh && ((n && last != oldstate) || newstate == EP_TCP_SYN_SENT ||
                   newstate == EP_TCP_LISTEN || newstate == EP_TCP_SYN_RECV)) {
        int z = 0;
        struct sk_hist *zero = zero_hist.lookup(&z);
        if (zero)
            bpf_probe_read_kernel(h, sizeof(*h), zero);
        h->first_ts = now;
        n = 0;
    }
    struct state_rec *r = &h->states[n & (NSTATES - 1)];
    r->ts = now;
    r->oldstate = oldstate;
    r->newstate = newstate;
    h->nstates = n + 1;
    if (newstate == EP_TCP_SYN_RECV || oldstate == EP_TCP_SYN_RECV)
        h->hflags |= HF_PASSIVE;
    if (newstate == EP_TCP_ESTABLISHED && !h->est_ts)
        h->est_ts = now;
    if (newstate == EP_TCP_CLOSE_WAIT && !h->close_wait_ts) {
        h->close_wait_ts = now;
        /* a child socket gets its struct socket only when accept() grafts it:
         * none yet means the peer closed while the connection sat in the queue */
        if ((h->hflags & HF_PASSIVE) && !KR(sk, sk_socket))
            h->hflags |= HF_UNACCEPTED_FIN;
    }
    /* ESTABLISHED -> FIN_WAIT1 and CLOSE_WAIT -> LAST_ACK happen only in
     * tcp_shutdown() or tcp_close(), in the caller's context; after close()
     * nothing can send on the socket again, so a later failing send means
     * shutdown(). The shutdown hook (--syscalls) knows better: keep its how. */
    if (((oldstate == EP_TCP_ESTABLISHED && newstate == EP_TCP_FIN_WAIT1) ||
         (oldstate == EP_TCP_CLOSE_WAIT && newstate == EP_TCP_LAST_ACK)) && !h->shut_how) {
        h->shut_how = SHUT_FIN_SENT;
        h->shut_ts = now;
        h->shut_pid = bpf_get_current_pid_tgid() >> 32;
    }
    /* the 4-tuple is final once ESTABLISHED; before that the local port may
     * not be bound yet. Reading it on every change cost ~60 ns each. */
    if (!h->lport || newstate == EP_TCP_ESTABLISHED)
        ep_read_tuple(sk, h);
}

static __always_inline void ep_on_rst(struct sock *sk)
{
    struct sk_hist *h = ep_hist_get(sk);
    if (!h)
        return;
    h->rst_ts = bpf_ktime_get_ns();
    h->rst_state = KR(sk, __sk_common.skc_state);
    h->rst_sk_err = KR(sk, sk_err);
    ep_read_tuple(sk, h);
}

static __always_inline void ep_on_error_report(struct sock *sk)
{
    u16 proto = KR(sk, sk_protocol);
    if (proto != EP_IPPROTO_TCP)
        return;
    u64 key = (u64)sk;
    struct sk_hist *h = hist.lookup(&key);
    if (!h)
        return;
    h->err_reported = KR(sk, sk_err);
    h->err_ts = bpf_ktime_get_ns();
}

/* The error point of a send (sk_stream_error, sock_sendmsg's result, the pipe
 * or UNIX write path) saw this failure: keep what it saw for sys_exit. sk is
 * 0 for pipes. The caller has applied the task filters. */
static __always_inline void ep_inflight_fill(void *ctx, struct inflight *f, struct sock *sk,
                                             int flags, int err, u8 path)
{
    f->ts = bpf_ktime_get_ns();
    f->sk = (u64)sk;
    f->err_at_hook = err;
    f->flags = flags;
    f->path = path;
    if (sk) {
        f->sk_err_at_hook = KR(sk, sk_err);
        f->shutdown_at_hook = KR(sk, sk_shutdown);
        f->state_at_hook = KR(sk, __sk_common.skc_state);
    }
    f->kstack = -1;
#if WANT_STACKS
    f->kstack = stacks.get_stackid(ctx, 0);
#endif
}

static __always_inline void ep_on_send_error(void *ctx, struct sock *sk, int flags, int err, u8 path)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct inflight f = {};
    ep_inflight_fill(ctx, &f, sk, flags, err, path);
    inflight.update(&tid, &f);
}

/* ---- mechanisms ----------------------------------------------------------- */

#if HOOK_STATE == 1
int kprobe__tcp_set_state(struct pt_regs *ctx, struct sock *sk, int state)
{
    int old = KR(sk, __sk_common.skc_state);
    if (old != state)
        ep_on_state(sk, old, state);
    return 0;
}
#elif HOOK_STATE == 2
KFUNC_PROBE(tcp_set_state, struct sock *sk, int state)
{
    int old = KR(sk, __sk_common.skc_state);
    if (old != state)
        ep_on_state(sk, old, state);
    return 0;
}
#elif HOOK_STATE == 3
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != EP_IPPROTO_TCP)
        return 0;
    ep_on_state((struct sock *)args->skaddr, args->oldstate, args->newstate);
    return 0;
}
#elif HOOK_STATE == 4
/* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate):
 * the raw form skips formatting the event record (addresses, ports) that the
 * classic tracepoint does before our program runs: ~4x cheaper per change */
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    struct sock *sk = (struct sock *)ctx->args[0];
    u16 proto = KR(sk, sk_protocol);
    if (proto != EP_IPPROTO_TCP)
        return 0;
    ep_on_state(sk, (int)ctx->args[1], (int)ctx->args[2]);
    return 0;
}
#endif

#if HOOK_RST == 1
int kprobe__tcp_reset(struct pt_regs *ctx, struct sock *sk)
{
    ep_on_rst(sk);
    return 0;
}
#elif HOOK_RST == 2
KFUNC_PROBE(tcp_reset, struct sock *sk)
{
    ep_on_rst(sk);
    return 0;
}
#elif HOOK_RST == 3
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    ep_on_rst((struct sock *)args->skaddr);
    return 0;
}
#endif

#if HOOK_SERR == 1
int kprobe__sk_stream_error(struct pt_regs *ctx, struct sock *sk, int flags, int err)
{
    /* EPIPE and ECONNRESET both enter with err == -EPIPE (ECONNRESET is the
     * pending sk_err it substitutes); -EAGAIN etc. are not ours */
    if (err == -EP_EPIPE && ep_task_wanted(bpf_get_current_pid_tgid() >> 32))
        ep_on_send_error(ctx, sk, flags, err, PATH_STREAM_ERR);
    return 0;
}
#elif HOOK_SERR == 2
KFUNC_PROBE(sk_stream_error, struct sock *sk, int flags, int err)
{
    if (err == -EP_EPIPE && ep_task_wanted(bpf_get_current_pid_tgid() >> 32))
        ep_on_send_error(ctx, sk, flags, err, PATH_STREAM_ERR);
    return 0;
}
#endif
/* HOOK_SERR == 4 (sock:sock_send_length) is with the report points below */

#if HOOK_PIPE == 1
/* Entry of the pipe write path (pipe_write, or anon_pipe_write and
 * fifo_pipe_write on newer kernels; the loader attaches this function to
 * whichever the plan found). With no readers left the write fails with EPIPE
 * right away: record that this kernel path is the one that fails it. */
int ep_pipe_write(struct pt_regs *ctx, struct kiocb *iocb)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!ep_task_wanted(id >> 32))
        return 0;
    struct file *f = 0;
    struct pipe_inode_info *pipe = 0;
    unsigned int readers = 1;
    bpf_probe_read_kernel(&f, sizeof(f), &iocb->ki_filp);
    if (f)
        bpf_probe_read_kernel(&pipe, sizeof(pipe), &f->private_data);
    if (pipe)
        bpf_probe_read_kernel(&readers, sizeof(readers), &pipe->readers);
    if (!readers)
        ep_on_send_error(ctx, 0, 0, -EP_EPIPE, PATH_PIPE_WRITE);
    return 0;
}
#endif

#if HOOK_UNIX == 1
/* unix_stream_sendmsg(): EPIPE when we shut down our sending side or the
 * peer shut down its receiving side (it closed). */
int kprobe__unix_stream_sendmsg(struct pt_regs *ctx, struct socket *sock)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!ep_task_wanted(id >> 32))
        return 0;
    struct sock *sk = 0;
    bpf_probe_read_kernel(&sk, sizeof(sk), &sock->sk);
    if (!sk)
        return 0;
    u8 shut = KR(sk, sk_shutdown);
    u8 peer_shut = 0;
    struct sock *peer = 0;
    bpf_probe_read_kernel(&peer, sizeof(peer), &((struct unix_sock *)sk)->peer);
    if (peer)
        peer_shut = KR(peer, sk_shutdown);
    if ((shut & 2) || (peer_shut & 1))         /* SEND_SHUTDOWN, RCV_SHUTDOWN */
        ep_on_send_error(ctx, sk, 0, -EP_EPIPE, PATH_UNIX_SEND);
    return 0;
}
#endif

#if HOOK_EREP == 4
RAW_TRACEPOINT_PROBE(inet_sk_error_report)
{
    /* TP_PROTO(const struct sock *sk) */
    ep_on_error_report((struct sock *)ctx->args[0]);
    return 0;
}
#endif

/* ---- files: fd -> struct file -> socket / pipe ----------------------------- */

static __always_inline struct file *ep_fd_file(int fd)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    struct files_struct *files = 0;
    struct fdtable *fdt = 0;
    struct file **fda = 0;
    struct file *f = 0;
    unsigned int max = 0;
    if (fd < 0)
        return 0;
    bpf_probe_read_kernel(&files, sizeof(files), &t->files);
    if (!files)
        return 0;
    bpf_probe_read_kernel(&fdt, sizeof(fdt), &files->fdt);
    if (!fdt)
        return 0;
    bpf_probe_read_kernel(&max, sizeof(max), &fdt->max_fds);
    if ((unsigned int)fd >= max)
        return 0;
    bpf_probe_read_kernel(&fda, sizeof(fda), &fdt->fd);
    bpf_probe_read_kernel(&f, sizeof(f), &fda[fd]);
    return f;
}

static __always_inline u16 ep_file_mode(struct file *f)
{
    struct inode *ino = 0;
    u16 mode = 0;
    bpf_probe_read_kernel(&ino, sizeof(ino), &f->f_inode);
    if (ino)
        bpf_probe_read_kernel(&mode, sizeof(mode), &ino->i_mode);
    return mode;
}

static __always_inline struct sock *ep_file_sock(struct file *f)
{
    struct socket *so = 0;
    struct sock *sk = 0;
    bpf_probe_read_kernel(&so, sizeof(so), &f->private_data);
    if (so)
        bpf_probe_read_kernel(&sk, sizeof(sk), &so->sk);
    return sk;
}

/* ---- syscalls ---------------------------------------------------------------- */

#if HOOK_ACCEPT == 3
static __always_inline void ep_on_accepted(long ret)
{
    if (ret < 0)
        return;
    struct file *f = ep_fd_file((int)ret);
    if (!f || (ep_file_mode(f) & EP_S_IFMT) != EP_S_IFSOCK)
        return;
    struct sock *sk = ep_file_sock(f);
    if (!sk)
        return;
    struct sk_hist *h = ep_hist_get(sk);
    if (!h)
        return;
    h->accept_ts = bpf_ktime_get_ns();
    h->accept_pid = bpf_get_current_pid_tgid() >> 32;
    ep_read_tuple(sk, h);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { ep_on_accepted(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { ep_on_accepted(args->ret); return 0; }
#endif

#if HOOK_SHUT == 3
TRACEPOINT_PROBE(syscalls, sys_enter_shutdown)
{
    struct file *f = ep_fd_file((int)args->fd);
    if (!f || (ep_file_mode(f) & EP_S_IFMT) != EP_S_IFSOCK)
        return 0;
    struct sock *sk = ep_file_sock(f);
    if (!sk)
        return 0;
    struct sk_hist *h = ep_hist_get(sk);
    if (!h)
        return 0;
    int how = args->how;
    /* a later SHUT_WR/SHUT_RDWR matters more than an earlier SHUT_RD */
    if (how >= 0 && how <= 2 && (h->shut_how == 0 || how >= 1)) {
        h->shut_how = how + 1;
        h->shut_ts = bpf_ktime_get_ns();
        h->shut_pid = bpf_get_current_pid_tgid() >> 32;
    }
    return 0;
}
#endif

#if HOOK_CLOSE == 3
/* A close() of a UNIX socket tells its peer's history who closed first; a
 * close() of a pipe's read end names the last reader. */
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    struct file *f = ep_fd_file((int)args->fd);
    if (!f)
        return 0;
    u16 fmt = ep_file_mode(f) & EP_S_IFMT;
    u64 now = bpf_ktime_get_ns();
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (fmt == EP_S_IFSOCK) {
        struct sock *sk = ep_file_sock(f);
        if (!sk)
            return 0;
        u16 family = KR(sk, __sk_common.skc_family);
        if (family != EP_AF_UNIX)
            return 0;
        u64 own = (u64)sk;
        hist.delete(&own);       /* its memory may soon be another socket's */
        struct unix_sock *u = (struct unix_sock *)sk;
        struct sock *peer = 0;
        bpf_probe_read_kernel(&peer, sizeof(peer), &u->peer);
        if (!peer)
            return 0;
        struct sk_hist *h = ep_hist_get(peer);
        if (!h)
            return 0;
        h->peer_close_ts = now;
        h->peer_close_pid = pid;
        bpf_get_current_comm(&h->peer_close_comm, sizeof(h->peer_close_comm));
    } else if (fmt == EP_S_IFIFO) {
        unsigned int fmode = 0;
        bpf_probe_read_kernel(&fmode, sizeof(fmode), &f->f_mode);
        if (!(fmode & 0x1))          /* FMODE_READ */
            return 0;
        u64 key = 0;
        bpf_probe_read_kernel(&key, sizeof(key), &f->private_data);
        if (!key)
            return 0;
        struct pipe_reader r = {};
        r.ts = now;
        r.pid = pid;
        r.exit_code = -1;
        r.how = 1;
        bpf_get_current_comm(&r.comm, sizeof(r.comm));
        pipe_readers.update(&key, &r);
    }
    return 0;
}
#endif

#if HOOK_SIGDLV == 3
TRACEPOINT_PROBE(signal, signal_deliver)
{
    if (args->sig != EP_SIGPIPE)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!ep_task_wanted(id >> 32))
        return 0;
    struct event *e = ep_event_new(EV_DELIVER);
    if (!e)
        return 0;
    e->sig_handler = (u64)args->sa_handler;
    events.ringbuf_submit(e, 0);
    ep_stat_inc(0);
    return 0;
}
#endif

#if HOOK_EXIT == 3
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    int code = 0;
    bpf_probe_read_kernel(&code, sizeof(code), &t->exit_code);
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
#if !FILTER_KINDS || (FILTER_KINDS & ((1 << KIND_PIPE) | (1 << KIND_FIFO)))
    /* an exiting reader closes its pipe ends without close(): look at the
     * first fds for pipe read ends and record this process as their last reader */
    struct files_struct *files = 0;
    bpf_probe_read_kernel(&files, sizeof(files), &t->files);
    if (files) {
        struct fdtable *fdt = 0;
        struct file **fda = 0;
        unsigned int max = 0;
        bpf_probe_read_kernel(&fdt, sizeof(fdt), &files->fdt);
        if (fdt) {
            bpf_probe_read_kernel(&max, sizeof(max), &fdt->max_fds);
            bpf_probe_read_kernel(&fda, sizeof(fda), &fdt->fd);
        }
        #pragma clang loop unroll(disable)
        for (int i = 0; i < EXIT_SCAN_FDS; i++) {
            if (!fda || i >= max)
                break;
            struct file *f = 0;
            bpf_probe_read_kernel(&f, sizeof(f), &fda[i]);
            if (!f)
                continue;
            if ((ep_file_mode(f) & EP_S_IFMT) != EP_S_IFIFO)
                continue;
            unsigned int fmode = 0;
            bpf_probe_read_kernel(&fmode, sizeof(fmode), &f->f_mode);
            if (!(fmode & 0x1))
                continue;
            u64 key = 0;
            bpf_probe_read_kernel(&key, sizeof(key), &f->private_data);
            if (!key)
                continue;
            struct pipe_reader r = {};
            r.ts = bpf_ktime_get_ns();
            r.pid = pid;
            r.exit_code = code;
            r.how = 2;
            bpf_get_current_comm(&r.comm, sizeof(r.comm));
            pipe_readers.update(&key, &r);
        }
    }
#endif
    if ((code & 0x7f) != EP_SIGPIPE)
        return 0;
    if (pid != (u32)id)
        return 0;              /* report the process once, at its leader */
    if (!ep_task_wanted(pid))
        return 0;
    ep_stat_inc(4);
    struct event *e = ep_event_new(EV_EXIT);
    if (!e)
        return 0;
    e->ret = code;
    events.ringbuf_submit(e, 0);
    ep_stat_inc(0);
    return 0;
}
#endif

/* ---- the report point: one failing send or write -------------------------- */
/* Where failures are reported (tracer/plan.py, send_failure and pipe_failure):
 *   REPORT_SENDLEN   sockets: sock:sock_send_length, when sock_sendmsg() returns
 *                    the error;
 *   REPORT_PIPE_SIG  pipes/FIFOs: signal:signal_generate, since a pipe write
 *                    with no readers always raises SIGPIPE;
 *   REPORT_KRET      sockets, on kernels with kprobes but without
 *                    sock_send_length: where sk_stream_error(),
 *                    unix_stream_sendmsg() or unix_seqpacket_sendmsg() return
 *                    the error (the TCP one runs only when a send fails);
 *   HOOK_SYSEXIT     otherwise (or with --syscalls) the raw sys_exit.
 * All but the last hook no syscall, so the rest of the host pays nothing; the
 * syscall number and fd then come from the task's saved user registers. */

#if HOOK_SYSEXIT == 4 || REPORT_SENDLEN || REPORT_PIPE_SIG || REPORT_KRET
static __always_inline int ep_is_send_family(long nr)
{
    return nr == NR_write || nr == NR_writev || nr == NR_sendto || nr == NR_sendmsg ||
           nr == NR_sendmmsg || nr == NR_sendfile || nr == NR_splice || nr == NR_pwritev ||
           nr == NR_pwritev2 || nr == NR_vmsplice || nr == NR_tee || nr == NR_pwrite64;
}

/* REG_* name the pt_regs fields of the architecture (tracer/program.py) */
#define SYSCALL_REG(regs, field) ({                                   \
        unsigned long __v = 0;                                        \
        bpf_probe_read_kernel(&__v, sizeof(__v), &(regs)->field);     \
        __v; })

/* The syscall this task is in, the fd it writes to and its flags; nr is -1
 * when that is no send-family syscall (io_uring, a kernel thread). */
static __always_inline void ep_syscall_args(struct pt_regs *regs, long *nr, int *fd, u32 *flags)
{
    long n = SYSCALL_REG(regs, REG_NR);
    *flags = 0;
    *fd = -1;
    *nr = -1;
    if (!ep_is_send_family(n))
        return;
    *nr = n;
    *fd = (int)SYSCALL_REG(regs, REG_ARG1);
    if (n == NR_sendto || n == NR_sendmmsg)
        *flags = (u32)SYSCALL_REG(regs, REG_ARG4);
    else if (n == NR_sendmsg)
        *flags = (u32)SYSCALL_REG(regs, REG_ARG3);
    else if (n == NR_splice)
        *fd = (int)SYSCALL_REG(regs, REG_ARG3);
    else if (n == NR_tee)
        *fd = (int)SYSCALL_REG(regs, REG_ARG2);
}

/* One failing call: count it exactly, then emit an event with everything
 * known. ret is what the call returns; f or sk name the target (the fd is
 * resolved when both are 0); fl_in / sg_in: what the error point and the
 * SIGPIPE generation saw, when the caller holds it (else taken from the maps). */
static __always_inline void ep_report(void *ctx, long ret, long nr, int fd, u32 flags,
                                      struct file *f, struct sock *sk,
                                      struct inflight *fl_in, struct sigrec *sg_in)
{
    ep_stat_inc(3);
    u64 now = bpf_ktime_get_ns();
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!f && !sk)
        f = ep_fd_file(fd);
    u16 fmt = sk ? EP_S_IFSOCK : (f ? (ep_file_mode(f) & EP_S_IFMT) : 0);
    u8 kind = KIND_OTHER, state_now = 0, shutdown = 0, peer_gone = 0;
    u16 family = 0, sktype = 0;
    if (fmt == EP_S_IFSOCK) {
        if (!sk)
            sk = ep_file_sock(f);
        kind = KIND_SOCK;
        if (sk) {
            u16 proto = KR(sk, sk_protocol);
            family = KR(sk, __sk_common.skc_family);
            sktype = KR(sk, sk_type);
            state_now = KR(sk, __sk_common.skc_state);
            shutdown = KR(sk, sk_shutdown);
            if ((family == EP_AF_INET || family == EP_AF_INET6) && proto == EP_IPPROTO_TCP)
                kind = KIND_TCP;
            else if (family == EP_AF_UNIX)
                kind = KIND_UNIX;
        }
    } else if (fmt == EP_S_IFIFO) {
        /* anonymous pipes live on pipefs; a FIFO has an inode on a real fs */
        struct inode *ino = 0;
        struct super_block *sb = 0;
        unsigned long magic = 0;
        bpf_probe_read_kernel(&ino, sizeof(ino), &f->f_inode);
        if (ino)
            bpf_probe_read_kernel(&sb, sizeof(sb), &ino->i_sb);
        if (sb)
            bpf_probe_read_kernel(&magic, sizeof(magic), &sb->s_magic);
        kind = magic == EP_PIPEFS_MAGIC ? KIND_PIPE : KIND_FIFO;
    }
    /* what the error point and the signal generation saw, if it was this
     * call (the caller may already hold one or both); taken before any
     * filter returns, so a filtered-out failure's records cannot be
     * mistaken for a later one's */
    struct inflight fl = {};
    u8 have_fl = 0;
    if (fl_in) {
        fl = *fl_in;
        have_fl = 1;
    } else {
        struct inflight *inf = inflight.lookup(&tid);
        if (inf && now - inf->ts < 1000000000ULL && (!sk || inf->sk == (u64)sk)) {
            fl = *inf;
            have_fl = 1;
        }
        if (inf)
            inflight.delete(&tid);
    }
    struct sigrec sg = {};
    u8 have_sig = 0;
    if (sg_in) {
        sg = *sg_in;
        have_sig = 1;
    } else {
        struct sigrec *sp = sigs.lookup(&tid);
        if (sp && now - sp->ts < 1000000000ULL) {
            sg = *sp;
            have_sig = 1;
        }
        if (sp)
            sigs.delete(&tid);
    }
#if FILTER_KINDS
    if (!((FILTER_KINDS >> kind) & 1))
        return;
#endif
#if FILTER_FAMILY
    if (kind != KIND_TCP || family != FILTER_FAMILY)
        return;
#endif

    struct sk_hist *h = 0;
    if (sk) {
        u64 key = (u64)sk;
        h = hist.lookup(&key);
    }
    u16 lport = 0, rport = 0;
    if (h && h->lport) {
        lport = h->lport;
        rport = h->rport;
    } else if (kind == KIND_TCP) {
        u16 dport_be = KR(sk, __sk_common.skc_dport);
        lport = KR(sk, __sk_common.skc_num);
        rport = EP_NTOHS(dport_be);
    }
#if FILTER_LPORT
    if (kind != KIND_TCP || !lports.lookup(&lport))
        return;
#endif
#if FILTER_DPORT
    if (kind != KIND_TCP || !dports.lookup(&rport))
        return;
#endif

    u8 sig_disp = sg.handler == 0 ? 0 : (sg.handler == 1 ? 1 : 2);

    struct unix_sock *u = 0;
    struct sock *peer = 0;
    if (kind == KIND_UNIX) {
        u = (struct unix_sock *)sk;
        bpf_probe_read_kernel(&peer, sizeof(peer), &u->peer);
        peer_gone = peer == 0;
    }
    /* the facts that decide the cause */
    u8 shut_how = h ? h->shut_how : 0;
    u8 aac = h && ((h->hflags & HF_UNACCEPTED_FIN) ||
                   (h->accept_ts && h->close_wait_ts && h->close_wait_ts <= h->accept_ts));
    if (kind == KIND_UNIX && !shut_how && (shutdown & 2) && peer) {
        /* our SEND_SHUTDOWN with the peer still open: our shutdown(SHUT_WR)
         * (a peer that closed was orphaned: sock_orphan() cleared its
         * sk_socket; a peer's SHUT_RD looks the same as ours) */
        if (KR(peer, sk_socket))
            shut_how = SHUT_SEND_SIDE;
    }
    struct pipe_inode_info *pipe = 0;
    if (kind == KIND_PIPE || kind == KIND_FIFO) {
        bpf_probe_read_kernel(&pipe, sizeof(pipe), &f->private_data);
        unsigned int readers = 1;
        if (pipe)
            bpf_probe_read_kernel(&readers, sizeof(readers), &pipe->readers);
        peer_gone = readers == 0;
    }

    /* exact counters first: they must not depend on the ring buffer */
    struct count_key ck = {};
    ck.kind = kind;
    ck.state_now = state_now;
    ck.nosignal = (flags & EP_MSG_NOSIGNAL) ? 1 : 0;
    ck.sig_result = have_sig ? sg.result : NOSIG;
    ck.sig_blocked = sg.blocked;
    ck.sig_disp = sig_disp;
    ck.family = family;
    ck.peer_gone = peer_gone;
    ck.err = (s32)ret;
    /* a peer that connected to us comes from an ephemeral port: counting by
     * it would spread one client over thousands of keys and fill the map */
    ck.shut_how = shut_how;
    ck.accepted_after_close = aac;
    if (h) {
        ck.has_hist = 1;
        ck.rst_state = h->rst_state;
        ck.err_reported = h->err_reported;
    }
    /* (1) exact: by the facts alone, a few hundred keys at most. insert fails
     * when another CPU got there first: add to its entry, lose nothing */
    u64 one = 1, *cnt = counts.lookup(&ck);
    if (!cnt && counts.insert(&ck, &one) != 0 && !(cnt = counts.lookup(&ck)))
        ep_stat_inc(2);
    if (cnt)
        __sync_fetch_and_add(cnt, 1);
    /* (2) best effort: by remote endpoint too; a peer that connected to us
     * comes from an ephemeral port, so count it by address only */
    struct count_key rk = ck;
    rk.rport = (h && (h->accept_ts || (h->hflags & HF_PASSIVE))) ? 0 : rport;
    if (h) {
        __builtin_memcpy(rk.raddr, h->raddr, 16);
    } else if (kind == KIND_TCP) {
        if (family == EP_AF_INET) {
            u32 d = KR(sk, __sk_common.skc_daddr);
            __builtin_memcpy(rk.raddr, &d, 4);
        } else {
            bpf_probe_read_kernel(rk.raddr, 16, &sk->__sk_common.skc_v6_daddr);
        }
    }
    cnt = counts_remote.lookup(&rk);
    if (!cnt && counts_remote.insert(&rk, &one) != 0 && !(cnt = counts_remote.lookup(&rk)))
        ep_stat_inc(6);
    if (cnt)
        __sync_fetch_and_add(cnt, 1);

    struct event *e = ep_event_new(EV_FAIL);
    if (!e)
        return;
    e->kind = kind;
    e->shut_how = shut_how;
    e->accepted_after_close = aac;
    e->ts = now;
    e->ret = (s32)ret;
    e->fd = fd;
    e->syscall_nr = (u32)nr;
    e->flags = flags;
    e->sk = (u64)sk;
    e->state_now = state_now;
    e->sk_shutdown = shutdown;
    e->sock_type = sktype;
    e->peer_gone = peer_gone;
    e->cgroup = bpf_get_current_cgroup_id();
    e->kstack = -1;
    e->ustack = -1;
    if (have_fl) {
        e->path = fl.path;
        e->err_at_hook = fl.err_at_hook;
        e->sk_err_at_hook = fl.sk_err_at_hook;
        e->kstack = fl.kstack;
        if (!flags)
            e->flags = fl.flags;
    }
    if (have_sig) {
        e->sig_result = sg.result;
        e->sig_blocked = sg.blocked;
        e->sig_disp = sig_disp;
        e->sig_handler = sg.handler;
    } else {
        e->sig_result = NOSIG;
    }
#if WANT_STACKS
    e->ustack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
#endif
    if (h) {
        e->has_hist = 1;
        bpf_probe_read_kernel(&e->hist, sizeof(e->hist), h);
    }
    if (kind == KIND_TCP) {
        struct tcp_sock *tp = (struct tcp_sock *)sk;
        bpf_probe_read_kernel(&e->bytes_sent, 8, &tp->bytes_sent);
        bpf_probe_read_kernel(&e->bytes_acked, 8, &tp->bytes_acked);
        bpf_probe_read_kernel(&e->bytes_received, 8, &tp->bytes_received);
        if (!h || !h->lport) {
            e->hist.lport = lport;
            e->hist.rport = rport;
            e->hist.family = family;
            __builtin_memcpy(e->hist.raddr, rk.raddr, 16);
            if (family == EP_AF_INET) {
                u32 s = KR(sk, __sk_common.skc_rcv_saddr);
                __builtin_memcpy(e->hist.laddr, &s, 4);
            } else {
                bpf_probe_read_kernel(e->hist.laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
            }
        }
    } else if (kind == KIND_UNIX) {
        e->peer_shutdown = 0;
        if (peer)
            bpf_probe_read_kernel(&e->peer_shutdown, 1, &peer->sk_shutdown);
        /* the peer's process: who connected to / was connected from us */
        struct pid *ppid = 0;
        bpf_probe_read_kernel(&ppid, sizeof(ppid), &sk->sk_peer_pid);
        if (ppid)
            bpf_probe_read_kernel(&e->peer_pid, sizeof(e->peer_pid), &ppid->numbers[0].nr);
        struct unix_address *addr = 0;
        bpf_probe_read_kernel(&addr, sizeof(addr), &u->addr);
        if (!addr && peer) {
            struct unix_sock *pu = (struct unix_sock *)peer;
            bpf_probe_read_kernel(&addr, sizeof(addr), &pu->addr);
        }
        if (addr) {
            int len = 0;
            bpf_probe_read_kernel(&len, sizeof(len), &addr->len);
            bpf_probe_read_kernel(e->name, sizeof(e->name), (char *)&addr->name[0] + 2);
        }
    } else if (kind == KIND_PIPE || kind == KIND_FIFO) {
        if (pipe) {
            bpf_probe_read_kernel(&e->pipe_readers, 4, &pipe->readers);
            bpf_probe_read_kernel(&e->pipe_writers, 4, &pipe->writers);
            u64 key = (u64)pipe;
            struct pipe_reader *r = pipe_readers.lookup(&key);
            if (r) {
                e->pipe_reader_pid = r->pid;
                e->pipe_reader_exit = r->exit_code;
                e->pipe_reader_ts = r->ts;
                e->pipe_how = r->how;
                __builtin_memcpy(e->peer_comm, r->comm, 16);
            }
        }
        struct inode *ino = 0;
        bpf_probe_read_kernel(&ino, sizeof(ino), &f->f_inode);
        if (ino)
            bpf_probe_read_kernel(&e->ino, 4, &ino->i_ino);
        struct dentry *de = 0;
        bpf_probe_read_kernel(&de, sizeof(de), &f->f_path.dentry);
        if (de) {
            const unsigned char *nm = 0;
            bpf_probe_read_kernel(&nm, sizeof(nm), &de->d_name.name);
            if (nm)
                bpf_probe_read_kernel_str(e->name, sizeof(e->name), nm);
        }
    }
    events.ringbuf_submit(e, 0);
    ep_stat_inc(0);
}
/* ep_syscall_args for the current task, from its saved user registers
 * (where no syscall hook hands them over); nr -1 for a kernel thread */
static __always_inline void ep_current_syscall(long *nr, int *fd, u32 *flags)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task_btf();
    unsigned int fl = 0;
    *nr = -1;
    *fd = -1;
    *flags = 0;
    bpf_probe_read_kernel(&fl, sizeof(fl), &t->flags);
    if (fl & 0x00200000)               /* PF_KTHREAD: no user registers */
        return;
    ep_syscall_args((struct pt_regs *)bpf_task_pt_regs(t), nr, fd, flags);
}
#endif  /* a report point */

/* ---- report sources ---------------------------------------------------------- */

#if HOOK_SERR == 4 || REPORT_SENDLEN
RAW_TRACEPOINT_PROBE(sock_send_length)
{
    /* TP_PROTO(struct sock *sk, int ret, int flags): runs for every send on
     * the host, so the cheap test comes first */
    int ret = (int)ctx->args[1];
    if (ret >= 0 || !ep_task_wanted(bpf_get_current_pid_tgid() >> 32))
        return 0;
    struct sock *sk = (struct sock *)ctx->args[0];
#if REPORT_SENDLEN
    if (!sk)
        return 0;
    long nr;
    int fd;
    u32 flags;
    ep_current_syscall(&nr, &fd, &flags);
#if HOOK_SERR == 4
    struct inflight fl = {};
    ep_inflight_fill(ctx, &fl, sk, flags, ret, PATH_SEND_LENGTH);
    ep_report(ctx, ret, nr, fd, flags, 0, sk, &fl, 0);
#else
    ep_report(ctx, ret, nr, fd, flags, 0, sk, 0, 0);   /* the kprobe's record is in inflight */
#endif
#else
    ep_on_send_error(ctx, sk, (int)ctx->args[2], ret, PATH_SEND_LENGTH);
#endif
    return 0;
}
#endif

#if REPORT_KRET
/* The function that failed the send returns: the entry probe (HOOK_SERR,
 * HOOK_UNIX) left its record in inflight, and a SIGPIPE, if any, has been
 * generated by now (send_sig() runs before these functions return). */
static __always_inline void ep_report_at_return(struct pt_regs *ctx)
{
    int ret = (int)PT_REGS_RC(ctx);
    if (ret != -EP_EPIPE && ret != -EP_ECONNRESET)
        return;
    u64 id = bpf_get_current_pid_tgid();
    if (!ep_task_wanted(id >> 32))
        return;
    u32 tid = (u32)id;
    struct sock *sk = 0;
    struct inflight *inf = inflight.lookup(&tid);
    if (inf)
        sk = (struct sock *)inf->sk;    /* else found from the fd */
    long nr;
    int fd;
    u32 flags;
    ep_current_syscall(&nr, &fd, &flags);
    ep_report(ctx, ret, nr, fd, flags, 0, sk, 0, 0);
}

int kretprobe__sk_stream_error(struct pt_regs *ctx)
{
    ep_report_at_return(ctx);
    return 0;
}

int kretprobe__unix_stream_sendmsg(struct pt_regs *ctx)
{
    ep_report_at_return(ctx);
    return 0;
}

int kretprobe__unix_seqpacket_sendmsg(struct pt_regs *ctx)
{
    ep_report_at_return(ctx);
    return 0;
}
#endif

#if HOOK_SIGGEN
/* SIGPIPE raised by the kernel for a send (send_sig(SIGPIPE, current, 0)):
 * for a pipe this is the report point (REPORT_PIPE_SIG); for a socket its
 * result, the blocked mask and the disposition wait for the report point */
static __always_inline void ep_on_sigpipe(void *ctx, struct task_struct *target, int result)
{
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    if (target != t)
        return;        /* SIGPIPE sent to someone else (kill -PIPE): not a send's */
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (!ep_task_wanted(id >> 32))
        return;
    struct sigrec s = {};
    s.ts = bpf_ktime_get_ns();
    s.result = result;
    u64 blocked = 0;
    bpf_probe_read_kernel(&blocked, sizeof(blocked), &t->blocked);
    s.blocked = (blocked >> (EP_SIGPIPE - 1)) & 1;
    struct sighand_struct *sh = 0;
    bpf_probe_read_kernel(&sh, sizeof(sh), &t->sighand);
    if (sh)
        bpf_probe_read_kernel(&s.handler, sizeof(s.handler), &sh->action[EP_SIGPIPE - 1].sa.sa_handler);
#if REPORT_PIPE_SIG
    long nr;
    int fd;
    u32 flags;
    ep_current_syscall(&nr, &fd, &flags);
    struct file *f = nr >= 0 ? ep_fd_file(fd) : 0;
    if (f && (ep_file_mode(f) & EP_S_IFMT) == EP_S_IFIFO) {
        ep_report(ctx, -EP_EPIPE, nr, fd, flags, f, 0, 0, &s);
        return;
    }
#endif
    sigs.update(&tid, &s);
}
#endif

#if HOOK_SIGGEN == 3
TRACEPOINT_PROBE(signal, signal_generate)
{
    if (args->sig != EP_SIGPIPE)
        return 0;
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    u32 tid = (u32)bpf_get_current_pid_tgid();
    ep_on_sigpipe(args, (u32)args->pid == tid ? t : 0, args->result);
    return 0;
}
#elif HOOK_SIGGEN == 4
/* TP_PROTO(int sig, struct kernel_siginfo *info, struct task_struct *task,
 *          int group, int result) */
RAW_TRACEPOINT_PROBE(signal_generate)
{
    if ((int)ctx->args[0] != EP_SIGPIPE)
        return 0;
    ep_on_sigpipe(ctx, (struct task_struct *)ctx->args[2], (int)ctx->args[4]);
    return 0;
}
#endif

#if HOOK_SYSEXIT == 4
RAW_TRACEPOINT_PROBE(sys_exit)
{
    /* TP_PROTO(struct pt_regs *regs, long ret): the cheap test comes first,
     * since this runs for every syscall on the host */
    long ret = (long)ctx->args[1];
    if (ret != -EP_EPIPE && ret != -EP_ECONNRESET)
        return 0;
    long nr;
    int fd;
    u32 flags;
    ep_syscall_args((struct pt_regs *)ctx->args[0], &nr, &fd, &flags);
    if (nr < 0 || !ep_task_wanted(bpf_get_current_pid_tgid() >> 32))
        return 0;
#if REPORT_SENDLEN || REPORT_PIPE_SIG
    /* only what the other report points do not see */
    struct file *f = ep_fd_file(fd);
    u16 fmt = f ? (ep_file_mode(f) & EP_S_IFMT) : 0;
    if ((REPORT_SENDLEN && fmt == EP_S_IFSOCK) || (REPORT_PIPE_SIG && fmt == EP_S_IFIFO))
        return 0;
    ep_report(ctx, ret, nr, fd, flags, f, 0, 0, 0);
#else
    ep_report(ctx, ret, nr, fd, flags, 0, 0, 0, 0);
#endif
    return 0;
}
#endif
