// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's record of every connect() to an inet or inet6 address: which process made it
 * (pid, thread, parent, uid, executable, argv) and where to, with the syscall's result.
 *
 * fexit on __sys_connect_file: connect(2), socketcall(SYS_CONNECT) and io_uring's connect all
 * end there, with the address already copied into the kernel. Each event goes into a ring buffer
 * that nothing reads until a collection drains it (sbx-capture drain): no daemon runs beside the
 * software under test, and the cost inside connect() is this program alone. A full ring buffer
 * counts the event as dropped (the collection reports it); every event, dropped or not, takes
 * the next sequence number.
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

SEC("fexit/__sys_connect_file")
int BPF_PROG(sbx_connect, struct file *file, struct sockaddr_storage *address, int addrlen,
	     int file_flags, int ret)
{
	struct socket *sock;
	struct task_struct *task;
	struct mm_struct *mm;
	struct sbx_event *e;
	__u64 *seq, *dropped, id;
	__u16 family = 0;
	unsigned long start, len;

	bpf_probe_read_kernel(&family, sizeof(family), address);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	seq = counter(SBX_COUNT_SEQ);
	dropped = counter(SBX_COUNT_DROPPED);
	if (!seq || !dropped)
		return 0;
	id = __sync_fetch_and_add(seq, 1);
	e = bpf_ringbuf_reserve(&sbx_events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(dropped, 1);
		return 0;
	}
	e->seq = id;
	e->time_ns = bpf_ktime_get_ns();
	e->pid_tgid = bpf_get_current_pid_tgid();
	e->uid_gid = bpf_get_current_uid_gid();
	e->ret = ret;
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
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
