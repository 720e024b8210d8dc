/* The record connect.bpf.c writes and sbx-capture.c reads: one layout for both. */
#ifndef SBX_EVENT_H
#define SBX_EVENT_H

#define SBX_RING_BYTES (16 * 1024 * 1024) /* ~40,000 events between two collections */
#define SBX_ARGV_BYTES 128                /* the first bytes of argv, NUL-separated */
#define SBX_NAME_BYTES 32                 /* per name in the executable's path */
#define SBX_EXE_DEPTH 8                   /* names in the path (a power of two) */
#define SBX_EXE_MOUNTS 4                  /* mount points crossed on the way up */
#define SBX_EXE_TRUNCATED 0x80

#define SBX_INFLIGHT 4096 /* threads in connect() at once */
#define SBX_RET_INFLIGHT 1 /* the result of a connect() that has not returned */

#define SBX_COUNT_SEQ 0
#define SBX_COUNT_DROPPED 1
#define SBX_COUNTERS 2

struct sbx_event {
	__u64 seq;
	__u64 time_ns;  /* CLOCK_MONOTONIC at the entry */
	__u64 pid_tgid; /* tgid << 32 | thread id */
	__u64 uid_gid;  /* gid << 32 | uid */
	__s32 ret;      /* what connect() returned: 0, or -errno; SBX_RET_INFLIGHT */
	__u32 ppid;
	__u16 family;   /* AF_INET, AF_INET6 */
	__u16 port;     /* network byte order */
	__u16 protocol; /* the socket's IP protocol: IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, ... */
	__u16 pad16;
	__u16 argv_len;
	__u8 exe_depth; /* names in exe[], | SBX_EXE_TRUNCATED */
	__u8 pad;
	__u8 addr[16];
	char argv[SBX_ARGV_BYTES];
	char exe[SBX_EXE_DEPTH][SBX_NAME_BYTES]; /* innermost first */
};

#endif
