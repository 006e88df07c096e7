// hostnet listener events: wakes the listener watcher the moment a TCP socket starts or stops
// listening, or a UDP socket binds or closes, in the watcher's own network namespace, so
// sock_diag is read right then instead of on the next tick. The events carry only what
// happened; sock_diag stays the truth.
//
// Built by net/build.rs with `clang -target bpf`; loaded by net/src/events.rs (aya), attached
// to the root cgroup (v2) so every process is seen. Self-contained on purpose: no vmlinux.h,
// no libbpf headers, no kprobes or tracefs (often missing in VM kernels and network
// namespaces); only cgroup hooks with stable, documented contexts:
//   sockops TCP_LISTEN_CB             listen(): after the socket is hashed
//   sockops STATE_CB (asked for in TCP_LISTEN_CB)   the listener leaves LISTEN (close)
//   post_bind4 / post_bind6           a UDP socket bound
//   sock_release                      an unconnected UDP socket closed

typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]

#define BPF_MAP_TYPE_RINGBUF 27
#define IPPROTO_UDP 17
#define TCP_LISTEN 10
#define BPF_SOCK_OPS_STATE_CB 10
#define BPF_SOCK_OPS_TCP_LISTEN_CB 11
#define BPF_SOCK_OPS_STATE_CB_FLAG (1 << 2)

enum hostnet_event { TCP_LISTEN_START = 1, TCP_LISTEN_STOP = 2, UDP_BOUND = 3, UDP_UNBOUND = 4 };

// The leading fields of the kernel's uapi `struct bpf_sock` (stable ABI).
struct bpf_sock {
    __u32 bound_dev_if;
    __u32 family;
    __u32 type;
    __u32 protocol;
    __u32 mark;
    __u32 priority;
    __u32 src_ip4;
    __u32 src_ip6[4];
    __u32 src_port;
    __u16 dst_port; // network byte order
};

// The leading fields of the kernel's uapi `struct bpf_sock_ops`.
struct bpf_sock_ops {
    __u32 op;
    __u32 args[4];
    __u32 family;
};

// The network namespace watched (its cookie); set by the loader.
volatile const __u64 HOSTNET_NETNS = 0;

// Four bytes per event — the kind in the low byte, the address family (AF_INET, AF_INET6)
// above it: the watcher drains the ring and reads only the sock_diag tables that changed.
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4096);
} HOSTNET_EVENTS SEC(".maps");

static long (*bpf_sock_ops_cb_flags_set)(struct bpf_sock_ops *ops, int flags) = (void *)59;
static __u64 (*bpf_get_netns_cookie)(void *ctx) = (void *)122;
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) = (void *)130;

static inline void emit(void *ctx, __u32 kind, __u32 family) {
    __u32 event = kind | (family & 0xffff) << 8;
    if (bpf_get_netns_cookie(ctx) == HOSTNET_NETNS)
        bpf_ringbuf_output(&HOSTNET_EVENTS, &event, sizeof(event), 0);
}

// Socket-ops and cgroup-sock programs must answer 1 (carry on): they only watch.
SEC("sockops")
int hostnet_tcp(struct bpf_sock_ops *ops) {
    if (ops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
        bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
        emit(ops, TCP_LISTEN_START, ops->family);
    } else if (ops->op == BPF_SOCK_OPS_STATE_CB && ops->args[0] == TCP_LISTEN) {
        emit(ops, TCP_LISTEN_STOP, ops->family);
    }
    return 1;
}

SEC("cgroup/post_bind4")
int hostnet_udp_bound4(struct bpf_sock *sk) {
    if (sk->protocol == IPPROTO_UDP)
        emit(sk, UDP_BOUND, sk->family);
    return 1;
}

SEC("cgroup/post_bind6")
int hostnet_udp_bound6(struct bpf_sock *sk) {
    if (sk->protocol == IPPROTO_UDP)
        emit(sk, UDP_BOUND, sk->family);
    return 1;
}

// Connected UDP sockets (clients, the agent's own flows) are never listeners: skipped.
SEC("cgroup/sock_release")
int hostnet_udp_released(struct bpf_sock *sk) {
    if (sk->protocol == IPPROTO_UDP && sk->dst_port == 0)
        emit(sk, UDP_UNBOUND, sk->family);
    return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
