// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's connection capture: every connect to an inet or inet6 address, with the process
 * that made it (pid, thread, parent, uid, executable, argv) and its result, every packet the
 * firewall's NFLOG rules log (the verdict, in the rule's prefix), and every change to the
 * firewall's rules, with the process that made it.
 *
 * connects: fexit on the protocols' connect: tcp_v4_connect, tcp_v6_connect (TCP: the SYN is out
 * when they return; a blocking connect() waits after that, its event already sent, and TCP Fast
 * Open's sendmsg comes here too) and inet_dgram_connect (UDP, ping and raw sockets, v4 and v6).
 * connect(2), socketcall and io_uring all come to these. One program per connect, none at the
 * syscall's entry: under emulation every program run and helper call is dear.
 * The executable and argv go in a process record, sent once per process image (sbx_procs
 * remembers which were sent); each event names its record.
 * packets: fentry on nft_log_eval or nflog_tg, where an NFLOG rule runs (sbx-capture attaches
 * whichever the kernel has); a datagram's record names its sender's process record too.
 * firewall changes: fexit on nf_tables_commit (an nf_tables transaction: iptables-nft, nft) and
 * on nf_setsockopt (a legacy x_tables table replaced: iptables-legacy, ip6tables-legacy,
 * arptables, ebtables), each when it succeeded, with the process that made it. Both run in the
 * changing process's own call, and only on a change: never per packet or per connect. Reads
 * (iptables-save, nft list) go through neither.
 *
 * All go into one ring buffer that nothing reads until a collection drains it (sbx-capture
 * drain): no daemon runs beside the software under test, and the cost is these programs alone.
 * A full ring buffer counts the record as dropped (the collection reports it); every record,
 * dropped or not, takes the next sequence number of its kind.
 *
 * Fields are read by direct loads where the verifier knows the type (BTF), a helper call only
 * for what it does not (the address, the packet's bytes, user memory, strings).
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
#define TCP_ESTABLISHED 1 /* a connected datagram socket's state too */

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
} __attribute__((preserve_access_index));

struct socket;

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct sock {
	struct {
		__u16 skc_family;
		__u8 skc_state;
		struct {
			struct net *net;
		} skc_net;
	} __sk_common;
	__u16 sk_protocol;
	struct {
		__u32 val;
	} sk_uid;
	struct socket *sk_socket;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
	struct file *file;
} __attribute__((preserve_access_index));

struct sk_buff {
	unsigned char *head;
	__u16 network_header;
	struct sock *sk;
} __attribute__((preserve_access_index));

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
	struct file *exe_file;
} __attribute__((preserve_access_index));

struct cred {
	struct {
		__u32 val;
	} uid;
	struct {
		__u32 val;
	} gid;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	const struct cred *cred;
	__u64 start_time;
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

struct sockaddr;

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

/* The process record sent for each thread group, by tgid (the least recently used forgotten:
 * a process that connects again then gets a new one) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SBX_PROCS);
	__type(key, __u32);
	__type(value, struct sbx_proc_seen);
} sbx_procs SEC(".maps");

static __always_inline __u64 *counter(__u32 index)
{
	return bpf_map_lookup_elem(&sbx_counts, &index);
}

/* The executable's path, innermost name first, across mount points; SBX_EXE_TRUNCATED if it is
 * deeper than SBX_EXE_DEPTH names (or a step could not be read). */
static __always_inline void exe_path(struct sbx_proc *p, struct file *exe)
{
	struct dentry *d;
	struct mount *mnt;
	int n = 0;

	p->exe_depth = 0;
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
				p->exe_depth = n;
				return;
			}
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		if (n >= SBX_EXE_DEPTH)
			break;
		bpf_probe_read_kernel_str(p->exe[n & (SBX_EXE_DEPTH - 1)], SBX_NAME_BYTES,
					  BPF_CORE_READ(d, d_name.name));
		n++;
		d = parent;
	}
	p->exe_depth = n | SBX_EXE_TRUNCATED;
}

/* The id of the current process image's record, sending the record first if this thread group
 * has none yet or exec'd since; -1 if the ring buffer had no room for it (the event is then
 * dropped too: an event must not name a record that was never stored). */
static __always_inline __u64 proc_id(struct task_struct *task, struct mm_struct *mm)
{
	__u32 tgid = task->tgid;
	__u64 born = task->group_leader->start_time;
	struct sbx_proc_seen *seen = bpf_map_lookup_elem(&sbx_procs, &tgid);
	struct sbx_proc_seen fresh;
	struct sbx_proc *p;
	__u64 *count;

	if (seen && seen->start_time == born && seen->mm == (__u64)mm)
		return seen->id;
	count = counter(SBX_COUNT_PROCS);
	if (!count)
		return -1;
	p = bpf_ringbuf_reserve(&sbx_events, sizeof(*p), 0);
	if (!p)
		return -1;
	p->kind = SBX_KIND_PROC;
	p->id = __sync_fetch_and_add(count, 1);
	p->argv_len = 0;
	if (mm) {
		unsigned long start = mm->arg_start, len = mm->arg_end - start;

		if (len > SBX_ARGV_BYTES)
			len = SBX_ARGV_BYTES;
		if (len > 0 &&
		    bpf_probe_read_user(p->argv, len & (SBX_ARGV_BYTES * 2 - 1), (void *)start) == 0)
			p->argv_len = len;
	}
	exe_path(p, mm ? mm->exe_file : 0);
	fresh.start_time = born;
	fresh.mm = (__u64)mm;
	fresh.id = p->id;
	bpf_ringbuf_submit(p, BPF_RB_NO_WAKEUP);
	/* after the submit: a thread that finds it here sends its event after the record */
	bpf_map_update_elem(&sbx_procs, &tgid, &fresh, BPF_ANY);
	return fresh.id;
}

static __always_inline __u64 pid_tgid_of(struct task_struct *task)
{
	return (__u64)task->tgid << 32 | (__u32)task->pid;
}

/* The event for a connect the protocol has just made (or refused): RET is its result. */
static __always_inline void record_connect(struct sock *sk, struct sockaddr *uaddr, int ret)
{
	/* struct sockaddr_in: family, port, address; sockaddr_in6: family, port, flowinfo,
	 * address: one read covers both */
	struct {
		__u16 family;
		__u16 port;
		__u8 a4[4];
		__u8 a6[16];
	} sa;
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	__u64 *seq = counter(SBX_COUNT_SEQ);
	__u64 *dropped = counter(SBX_COUNT_DROPPED);
	struct sbx_event *e;
	__u64 proc, number;

	if (!seq || !dropped)
		return;
	if (bpf_probe_read_kernel(&sa, sizeof(sa), uaddr))
		return;
	if (sa.family != AF_INET && sa.family != AF_INET6)
		return;
	number = __sync_fetch_and_add(seq, 1);
	/* the process record goes first: the drain reads the ring buffer in order */
	proc = proc_id(task, mm);
	e = proc == (__u64)-1 ? 0 : bpf_ringbuf_reserve(&sbx_events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(dropped, 1);
		return;
	}
	e->kind = SBX_KIND_CONNECT;
	e->seq = number;
	e->time_ns = bpf_ktime_get_ns();
	e->proc = proc;
	e->pid_tgid = pid_tgid_of(task);
	e->uid_gid = (__u64)task->cred->gid.val << 32 | task->cred->uid.val;
	e->ret = ret;
	e->ppid = task->real_parent->tgid;
	e->family = sa.family;
	e->port = sa.port;
	e->protocol = sk->sk_protocol;
	if (sa.family == AF_INET) {
		__builtin_memcpy(e->addr, sa.a4, 4);
		__builtin_memset(e->addr + 4, 0, 12);
	} else {
		__builtin_memcpy(e->addr, sa.a6, 16);
	}
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* TCP: the protocol's connect sends the SYN and returns; a blocking connect() then waits for
 * the answer, its event already sent. tcp_v6_connect calls tcp_v4_connect for a v4-mapped
 * address: the v6 one reports it. */
SEC("fexit/tcp_v4_connect")
int BPF_PROG(sbx_connect_tcp4, struct sock *sk, struct sockaddr *uaddr, int addr_len, int ret)
{
	if (sk->__sk_common.skc_family != AF_INET6)
		record_connect(sk, uaddr, ret);
	return 0;
}

SEC("fexit/tcp_v6_connect")
int BPF_PROG(sbx_connect_tcp6, struct sock *sk, struct sockaddr *uaddr, int addr_len, int ret)
{
	record_connect(sk, uaddr, ret);
	return 0;
}

/* UDP, ping and raw sockets, v4 and v6: connect() on a datagram socket never waits. */
SEC("fexit/inet_dgram_connect")
int BPF_PROG(sbx_connect_dgram, struct socket *sock, struct sockaddr *uaddr, int addr_len,
	     int flags, int ret)
{
	record_connect(sock->sk, uaddr, ret);
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

/* Every packet an NFLOG rule of the guest's firewall logs (orchestrator/egress/firewall.py: one per new
 * attempt, the verdict in the prefix), whether or not anything listens on the group. */
static __always_inline void record_packet(struct sk_buff *skb, __u8 pf, const char *prefix)
{
	/* the network header and the first 4 bytes after it (the ports): an IPv4 header with all
	 * its options is 60 bytes, IPv6's is 40 */
	__u8 h[64];
	struct sbx_packet *p;
	struct sock *sk = skb->sk;
	__u64 *seq, *dropped, proc = -1, pid_tgid = 0;
	__u32 ppid = 0;
	__u8 proto;
	__u32 l4;

	if (pf != AF_INET && pf != AF_INET6)
		return;
	seq = counter(SBX_COUNT_PACKETS);
	dropped = counter(SBX_COUNT_PACKETS_DROPPED);
	if (!seq || !dropped)
		return;
	/* one read: every helper call is dear under emulation */
	if (bpf_probe_read_kernel(h, sizeof(h), skb->head + skb->network_header))
		__builtin_memset(h, 0, sizeof(h));
	proto = pf == AF_INET ? h[9] : h[6];
	/* A datagram from a user's socket (it has a file; the kernel's own, ICMP errors' for one,
	 * have none) leaves in the call that sends it: the current task sent it. Only for a socket
	 * not connected (a connected one's connect event says who): sendto() with an address. Its
	 * process record goes before the packet's, as for a connect. */
	if (proto != 6 && sk && sk->__sk_common.skc_state != TCP_ESTABLISHED && sk->sk_socket &&
	    sk->sk_socket->file) {
		struct task_struct *task = bpf_get_current_task_btf();

		proc = proc_id(task, task->mm);
		if (proc != (__u64)-1) {
			pid_tgid = pid_tgid_of(task);
			ppid = task->real_parent->tgid;
		}
	}
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
	p->uid = sk ? sk->sk_uid.val : (__u32)-1;
	p->pid_tgid = pid_tgid;
	p->ppid = ppid;
	p->proc = proc;
	if (pf == AF_INET) {
		/* struct iphdr: version/ihl, tos, tot_len, id, frag_off, ttl, protocol, check, saddr,
		 * daddr */
		__builtin_memcpy(&p->ipid, h + 4, 2);
		__builtin_memcpy(p->src, h + 12, 4);
		__builtin_memcpy(p->dst, h + 16, 4);
		l4 = (h[0] & 0x0f) * 4;
	} else {
		/* struct ipv6hdr: version/class/flow (4), payload_len, nexthdr, hop_limit, saddr,
		 * daddr */
		__builtin_memcpy(p->src, h + 8, 16);
		__builtin_memcpy(p->dst, h + 24, 16);
		l4 = 40;
	}
	p->protocol = proto;
	if ((proto == 6 || proto == 17 || proto == 136 || proto == 132) && l4 >= 20) {
		l4 &= 0x3c;
		__builtin_memcpy(&p->sport, h + l4, 2);
		__builtin_memcpy(&p->dport, h + l4 + 2, 2);
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

	record_packet(pkt->skb, pkt->state->pf, BPF_CORE_READ(priv, prefix));
	return 0;
}

/* struct xt_nflog_info (uapi): len, group, threshold, flags, pad, prefix[64] */
#define XT_NFLOG_PREFIX_OFFSET 12

SEC("fentry/nflog_tg")
int BPF_PROG(sbx_packet_xt, struct sk_buff *skb, const struct xt_action_param *par)
{
	record_packet(skb, par->state->pf, (const char *)par->targinfo + XT_NFLOG_PREFIX_OFFSET);
	return 0;
}

/* The guest's own network namespace: a change elsewhere (unshare -n, a container) does not touch
 * the rules its traffic passes. Typeless: the kernel's BTF has no variables but per-CPU ones. */
extern const void init_net __ksym;

/* A change to the rules of NET, done (the caller checked it succeeded) by the current task. */
static __always_inline void record_fwchange(struct net *net, __u16 what)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 *seq = counter(SBX_COUNT_FWCHANGES);
	__u64 *dropped = counter(SBX_COUNT_FWCHANGES_DROPPED);
	struct sbx_fwchange *c;
	__u64 proc, number;

	if (!seq || !dropped)
		return;
	number = __sync_fetch_and_add(seq, 1);
	proc = proc_id(task, task->mm);
	c = proc == (__u64)-1 ? 0 : bpf_ringbuf_reserve(&sbx_events, sizeof(*c), 0);
	if (!c) {
		__sync_fetch_and_add(dropped, 1);
		return;
	}
	c->kind = SBX_KIND_FWCHANGE;
	c->what = what;
	c->flags = (const void *)net == &init_net ? 0 : SBX_FW_OTHER_NETNS;
	c->seq = number;
	c->time_ns = bpf_ktime_get_ns();
	c->pid_tgid = pid_tgid_of(task);
	c->uid_gid = (__u64)task->cred->gid.val << 32 | task->cred->uid.val;
	c->proc = proc;
	c->ppid = task->real_parent->tgid;
	c->netns = BPF_CORE_READ(net, ns.inum);
	bpf_ringbuf_submit(c, BPF_RB_NO_WAKEUP);
}

struct list_head {
	struct list_head *next;
} __attribute__((preserve_access_index));

/* Threads in an nf_tables commit that changes something (nf_tables_commit_audit_log saw a
 * non-empty list of changed tables), until the commit returns: iptables-nft commits an empty
 * batch on reads too (`iptables -L`, `-S`), which must not count as a change. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} sbx_commits SEC(".maps");

SEC("fentry/nf_tables_commit_audit_log")
int BPF_PROG(sbx_fwchange_nft_tables, struct list_head *adl, __u32 generation)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u8 one = 1;

	if (adl->next != adl)
		bpf_map_update_elem(&sbx_commits, &tid, &one, BPF_ANY);
	return 0;
}

/* An nf_tables transaction (a batch of iptables-nft or nft) committed. The batch runs in the
 * sender's own sendmsg(): the current task made it; NET is the namespace whose rules changed. */
SEC("fexit/nf_tables_commit")
int BPF_PROG(sbx_fwchange_nft, struct net *net, struct sk_buff *skb, int ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	if (!bpf_map_lookup_elem(&sbx_commits, &tid))
		return 0;
	bpf_map_delete_elem(&sbx_commits, &tid);
	if (ret == 0)
		record_fwchange(net, SBX_FW_NFT);
	return 0;
}

#define PF_INET 2
#define PF_INET6 10
#define IPT_SO_SET_REPLACE 64 /* IP6T_SO_SET_REPLACE too */
#define ARPT_SO_SET_REPLACE 96
#define EBT_SO_SET_ENTRIES 128

/* A legacy table replaced: every iptables-legacy change loads the whole table with one
 * setsockopt (the counters' own setsockopt that follows changes no rule). nf_setsockopt(sk, pf,
 * val, sockptr_t opt, len): opt is a struct in two registers, so the arguments are read by their
 * slots (ret with the helper) rather than through BPF_PROG. */
SEC("fexit/nf_setsockopt")
int sbx_fwchange_xt(unsigned long long *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	__u8 pf = (__u8)ctx[1];
	int val = (int)ctx[2];
	__u64 ret = 0;
	__u16 what = 0;

	if (pf == PF_INET && val == IPT_SO_SET_REPLACE)
		what = SBX_FW_IPT;
	else if (pf == PF_INET6 && val == IPT_SO_SET_REPLACE)
		what = SBX_FW_IP6T;
	else if (pf == PF_INET && val == ARPT_SO_SET_REPLACE)
		what = SBX_FW_ARPT;
	else if (pf == PF_INET && val == EBT_SO_SET_ENTRIES)
		what = SBX_FW_EBT;
	if (!what || bpf_get_func_ret(ctx, &ret) || (int)ret != 0)
		return 0;
	record_fwchange(BPF_CORE_READ(sk, __sk_common.skc_net.net), what);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
