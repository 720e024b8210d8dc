// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's connection capture: every connect() to an inet or inet6 address, with the process
 * that made it (pid, thread, parent, uid, executable, argv) and its result, and every packet the
 * firewall's NFLOG rules log (the verdict, in the rule's prefix).
 *
 * connect: fentry and fexit on __sys_connect_file. connect(2), socketcall(SYS_CONNECT) and
 * io_uring's connect all end there, with the address already copied into the kernel. The entry
 * notes the time and the destination per thread; the return sends the event with the result;
 * while a connect waits, the drain finds it in flight.
 * packets: fentry on nft_log_eval or nflog_tg, where an NFLOG rule runs (sbx-capture attaches
 * whichever the kernel has).
 *
 * Both go into one ring buffer that nothing reads until a collection drains it (sbx-capture
 * drain): no daemon runs beside the software under test, and the cost is these programs alone.
 * A full ring buffer counts the record as dropped (the collection reports it); every record,
 * dropped or not, takes the next sequence number of its kind.
 *
 * Kernel structures are declared with only the fields read here: libbpf relocates them against
 * the running kernel's BTF (CO-RE), so no kernel headers are needed to build this.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "event.h"

#define AF_INET 2
#define AF_INET6 10

struct qstr {
	const unsigned char *name;
} __attribute__((preserve_access_index));

struct dentry {
	struct dentry *d_parent;
	struct qstr d_name;
} __attribute__((preserve_access_index));

struct vfsmount {
	struct dentry *mnt_root;
} __attribute__((preserve_access_index));

struct mount {
	struct mount *mnt_parent;
	struct dentry *mnt_mountpoint;
	struct vfsmount mnt;
} __attribute__((preserve_access_index));

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	struct path f_path;
	void *private_data; /* a socket's file: its struct socket */
} __attribute__((preserve_access_index));

struct sock {
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

struct sk_buff {
	unsigned char *head;
	__u16 network_header;
	struct sock *sk;
} __attribute__((preserve_access_index));

struct sock___uid {
	struct {
		__u32 val;
	} sk_uid;
} __attribute__((preserve_access_index));

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
	struct file *exe_file;
} __attribute__((preserve_access_index));

struct task_struct {
	int tgid;
	struct task_struct *real_parent;
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

struct sockaddr_storage;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, SBX_RING_BYTES);
} sbx_events SEC(".maps");

/* [SBX_COUNT_SEQ]: events seen, [SBX_COUNT_DROPPED]: of them, not stored (ring buffer full) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SBX_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} sbx_counts SEC(".maps");

/* connects in progress, by thread (pid_tgid): what the entry knew, for the return to send and
 * for a collection meanwhile to see (the rest it reads from /proc: the process is still there) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SBX_INFLIGHT);
	__type(key, __u64);
	__type(value, struct sbx_pending);
} sbx_inflight SEC(".maps");

static __always_inline __u64 *counter(__u32 index)
{
	return bpf_map_lookup_elem(&sbx_counts, &index);
}

/* The executable's path, innermost name first, across mount points; SBX_EXE_TRUNCATED if it is
 * deeper than SBX_EXE_DEPTH names (or a step could not be read). */
static __always_inline void exe_path(struct sbx_event *e, struct mm_struct *mm)
{
	struct file *exe = BPF_CORE_READ(mm, exe_file);
	struct dentry *d;
	struct mount *mnt;
	int n = 0;

	e->exe_depth = 0;
	if (!exe)
		return;
	d = BPF_CORE_READ(exe, f_path.dentry);
	mnt = (void *)BPF_CORE_READ(exe, f_path.mnt) - bpf_core_field_offset(struct mount, mnt);
	for (int i = 0; i < SBX_EXE_DEPTH + SBX_EXE_MOUNTS; i++) {
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		struct dentry *root = BPF_CORE_READ(mnt, mnt.mnt_root);

		if (d == root || d == parent) {
			/* the root of this mount: go on from where it is mounted, up to the root of all */
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

			if (up == mnt || !up) {
				e->exe_depth = n;
				return;
			}
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		if (n >= SBX_EXE_DEPTH)
			break;
		bpf_probe_read_kernel_str(e->exe[n & (SBX_EXE_DEPTH - 1)], SBX_NAME_BYTES,
					  BPF_CORE_READ(d, d_name.name));
		n++;
		d = parent;
	}
	e->exe_depth = n | SBX_EXE_TRUNCATED;
}

/* Everything but the result, seq and time: read at the entry, while the process waits. */
static __always_inline void fill(struct sbx_event *e, struct file *file,
				 struct sockaddr_storage *address, __u16 family)
{
	struct socket *sock;
	struct task_struct *task;
	struct mm_struct *mm;
	unsigned long start, len;

	e->pid_tgid = bpf_get_current_pid_tgid();
	e->uid_gid = bpf_get_current_uid_gid();
	e->family = family;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (family == AF_INET) {
		/* struct sockaddr_in: family, port, address */
		bpf_probe_read_kernel(&e->port, 2, (void *)address + 2);
		bpf_probe_read_kernel(e->addr, 4, (void *)address + 4);
	} else {
		/* struct sockaddr_in6: family, port, flowinfo, address */
		bpf_probe_read_kernel(&e->port, 2, (void *)address + 2);
		bpf_probe_read_kernel(e->addr, 16, (void *)address + 8);
	}
	/* the IP protocol of the socket connect() was called on */
	sock = BPF_CORE_READ(file, private_data);
	e->protocol = BPF_CORE_READ(sock, sk, sk_protocol);
	task = (struct task_struct *)bpf_get_current_task();
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	mm = BPF_CORE_READ(task, mm);
	start = BPF_CORE_READ(mm, arg_start);
	len = BPF_CORE_READ(mm, arg_end) - start;
	if (len > SBX_ARGV_BYTES)
		len = SBX_ARGV_BYTES;
	e->argv_len = 0;
	if (len > 0 && bpf_probe_read_user(e->argv, len & (SBX_ARGV_BYTES * 2 - 1), (void *)start) == 0)
		e->argv_len = len;
	exe_path(e, mm);
}

static __always_inline __u16 inet_family(struct sockaddr_storage *address)
{
	__u16 family = 0;

	bpf_probe_read_kernel(&family, sizeof(family), address);
	return family == AF_INET || family == AF_INET6 ? family : 0;
}

/* The entry: the event is made here, kept per thread until the connect() returns. A blocking
 * connect() may wait minutes (a dropped SYN): a collection meanwhile finds it here (sbx-capture
 * drain prints what is in flight). */
SEC("fentry/__sys_connect_file")
int BPF_PROG(sbx_connect_entry, struct file *file, struct sockaddr_storage *address, int addrlen,
	     int file_flags)
{
	__u16 family = inet_family(address);
	__u64 key = bpf_get_current_pid_tgid();
	struct sbx_pending pending = {};
	struct socket *sock;
	__u64 *seq;

	if (!family)
		return 0;
	seq = counter(SBX_COUNT_SEQ);
	if (!seq)
		return 0;
	pending.seq = __sync_fetch_and_add(seq, 1);
	pending.time_ns = bpf_ktime_get_ns();
	pending.uid = (__u32)bpf_get_current_uid_gid();
	pending.family = family;
	bpf_probe_read_kernel(&pending.port, 2, (void *)address + 2);
	if (family == AF_INET)
		bpf_probe_read_kernel(pending.addr, 4, (void *)address + 4);
	else
		bpf_probe_read_kernel(pending.addr, 16, (void *)address + 8);
	sock = BPF_CORE_READ(file, private_data);
	pending.protocol = BPF_CORE_READ(sock, sk, sk_protocol);
	/* full: the return makes the event on its own */
	bpf_map_update_elem(&sbx_inflight, &key, &pending, BPF_ANY);
	return 0;
}

SEC("fexit/__sys_connect_file")
int BPF_PROG(sbx_connect, struct file *file, struct sockaddr_storage *address, int addrlen,
	     int file_flags, int ret)
{
	__u16 family = inet_family(address);
	__u64 key = bpf_get_current_pid_tgid();
	struct sbx_event *e;
	struct sbx_pending *entry;
	__u64 *seq, *dropped;

	if (!family)
		return 0;
	seq = counter(SBX_COUNT_SEQ);
	dropped = counter(SBX_COUNT_DROPPED);
	if (!seq || !dropped)
		return 0;
	entry = bpf_map_lookup_elem(&sbx_inflight, &key);
	e = bpf_ringbuf_reserve(&sbx_events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(dropped, 1);
		if (entry)
			bpf_map_delete_elem(&sbx_inflight, &key);
		return 0;
	}
	e->kind = SBX_KIND_CONNECT;
	if (entry) {
		e->seq = entry->seq;
		e->time_ns = entry->time_ns;
		bpf_map_delete_elem(&sbx_inflight, &key);
	} else {
		e->seq = __sync_fetch_and_add(seq, 1);
		e->time_ns = bpf_ktime_get_ns();
	}
	fill(e, file, address, family);
	e->ret = ret;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return 0;
}

/* The firewall's NFLOG rules, on either path iptables-nft may give them: a native nft `log`
 * expression (nft_log_eval) or the xtables target (nflog_tg). Their prefix says the verdict. */
struct nf_hook_state {
	__u8 pf;
} __attribute__((preserve_access_index));

struct nft_pktinfo {
	struct sk_buff *skb;
	const struct nf_hook_state *state;
} __attribute__((preserve_access_index));

struct nft_log {
	char *prefix;
} __attribute__((preserve_access_index));

struct nft_expr;

struct xt_action_param {
	const void *targinfo;
	const struct nf_hook_state *state;
} __attribute__((preserve_access_index));

/* Every packet an NFLOG rule of the guest's firewall logs (orchestrator/firewall.py: one per new
 * attempt, the verdict in the prefix), whether or not anything listens on the group. */
static __always_inline void record_packet(struct sk_buff *skb, __u8 pf, const char *prefix)
{
	struct sbx_packet *p;
	struct sock *sk;
	unsigned char *head, *l3;
	__u64 *seq, *dropped;
	__u8 ihl = 0, proto = 0;
	__u32 l4;

	if (pf != AF_INET && pf != AF_INET6)
		return;
	seq = counter(SBX_COUNT_PACKETS);
	dropped = counter(SBX_COUNT_PACKETS_DROPPED);
	if (!seq || !dropped)
		return;
	p = bpf_ringbuf_reserve(&sbx_events, sizeof(*p), 0);
	if (!p) {
		__sync_fetch_and_add(seq, 1);
		__sync_fetch_and_add(dropped, 1);
		return;
	}
	p->kind = SBX_KIND_PACKET;
	p->seq = __sync_fetch_and_add(seq, 1);
	p->time_ns = bpf_ktime_get_ns();
	p->family = pf;
	p->sport = p->dport = p->ipid = 0;
	__builtin_memset(p->src, 0, sizeof(p->src));
	__builtin_memset(p->dst, 0, sizeof(p->dst));
	sk = BPF_CORE_READ(skb, sk);
	p->uid = sk ? BPF_CORE_READ((struct sock___uid *)sk, sk_uid.val) : (__u32)-1;
	head = BPF_CORE_READ(skb, head);
	l3 = head + BPF_CORE_READ(skb, network_header);
	if (pf == AF_INET) {
		/* struct iphdr: version/ihl, tos, tot_len, id, frag_off, ttl, protocol, check, saddr,
		 * daddr */
		bpf_probe_read_kernel(&ihl, 1, l3);
		bpf_probe_read_kernel(&p->ipid, 2, l3 + 4);
		bpf_probe_read_kernel(&proto, 1, l3 + 9);
		bpf_probe_read_kernel(p->src, 4, l3 + 12);
		bpf_probe_read_kernel(p->dst, 4, l3 + 16);
		l4 = (ihl & 0x0f) * 4;
	} else {
		/* struct ipv6hdr: version/class/flow (4), payload_len, nexthdr, hop_limit, saddr,
		 * daddr */
		bpf_probe_read_kernel(&proto, 1, l3 + 6);
		bpf_probe_read_kernel(p->src, 16, l3 + 8);
		bpf_probe_read_kernel(p->dst, 16, l3 + 24);
		l4 = 40;
	}
	p->protocol = proto;
	if (proto == 6 || proto == 17 || proto == 136 || proto == 132) {
		bpf_probe_read_kernel(&p->sport, 2, l3 + (l4 & 0x3f));
		bpf_probe_read_kernel(&p->dport, 2, l3 + (l4 & 0x3f) + 2);
	}
	p->prefix[0] = 0;
	if (prefix)
		bpf_probe_read_kernel_str(p->prefix, sizeof(p->prefix), prefix);
	bpf_ringbuf_submit(p, BPF_RB_NO_WAKEUP);
}

SEC("fentry/nft_log_eval")
int BPF_PROG(sbx_packet_nft, const struct nft_expr *expr, void *regs,
	     const struct nft_pktinfo *pkt)
{
	/* nft_expr_priv(expr): the expression's private data follows its ops pointer */
	struct nft_log *priv = (struct nft_log *)((void *)expr + sizeof(void *));

	record_packet(BPF_CORE_READ(pkt, skb), BPF_CORE_READ(pkt, state, pf),
		      BPF_CORE_READ(priv, prefix));
	return 0;
}

/* struct xt_nflog_info (uapi): len, group, threshold, flags, pad, prefix[64] */
#define XT_NFLOG_PREFIX_OFFSET 12

SEC("fentry/nflog_tg")
int BPF_PROG(sbx_packet_xt, struct sk_buff *skb, const struct xt_action_param *par)
{
	const char *info = BPF_CORE_READ(par, targinfo);

	record_packet(skb, BPF_CORE_READ(par, state, pf), info + XT_NFLOG_PREFIX_OFFSET);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
