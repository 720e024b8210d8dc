/* The record connect.bpf.c writes and sbx-capture.c reads: one layout for both. */
#ifndef SBX_EVENT_H
#define SBX_EVENT_H

#define SBX_RING_BYTES (16 * 1024 * 1024) /* ~70,000 attempts (a connect and a packet each) */
#define SBX_ARGV_BYTES 128                /* the first bytes of argv, NUL-separated */
#define SBX_NAME_BYTES 32                 /* per name in the executable's path */
#define SBX_EXE_DEPTH 8                   /* names in the path (a power of two) */
#define SBX_EXE_MOUNTS 4                  /* mount points crossed on the way up */
#define SBX_EXE_TRUNCATED 0x80

#define SBX_PROCS 16384 /* thread groups whose process record is remembered */

#define SBX_COUNT_SEQ 0
#define SBX_COUNT_DROPPED 1
#define SBX_COUNT_PACKETS 2         /* firewall records seen */
#define SBX_COUNT_PACKETS_DROPPED 3 /* of them, not stored */
#define SBX_COUNT_PROCS 4           /* process records sent */
#define SBX_COUNT_FWCHANGES 5       /* changes to the firewall's rules seen */
#define SBX_COUNT_FWCHANGES_DROPPED 6 /* of them, not stored */
#define SBX_COUNTERS 7

#define SBX_KIND_CONNECT 1
#define SBX_KIND_PACKET 2
#define SBX_KIND_PROC 3
#define SBX_KIND_FWCHANGE 4
#define SBX_PREFIX_BYTES 32

struct sbx_event {
	__u32 kind;     /* SBX_KIND_CONNECT */
	__u32 pad32;
	__u64 seq;
	__u64 time_ns;  /* CLOCK_MONOTONIC when the protocol's connect returned (a TCP SYN is out) */
	__u64 pid_tgid; /* tgid << 32 | thread id */
	__u64 uid_gid;  /* gid << 32 | uid */
	__u64 proc;     /* the sbx_proc record that names the executable and argv */
	__s32 ret;      /* what the protocol's connect returned: 0, or -errno */
	__u32 ppid;
	__u16 family;   /* AF_INET, AF_INET6 */
	__u16 port;     /* network byte order */
	__u16 protocol; /* the socket's IP protocol: IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, ... */
	__u16 pad16;
	__u8 addr[16];
};

/* A process image's executable and argv, sent once (again after an exec) before the first
 * event that names it: the path walk and the copy from user memory are the dearest part of an
 * event, and a process that connects 10,000 times would repeat them 10,000 times. argv is as
 * it was at that first connect (a later rewrite, setproctitle, is not seen). */
struct sbx_proc {
	__u32 kind;     /* SBX_KIND_PROC */
	__u32 pad32;
	__u64 id;       /* what sbx_event.proc holds; from 0 in each load of the capture */
	__u16 argv_len;
	__u8 exe_depth; /* names in exe[], | SBX_EXE_TRUNCATED; 0: no executable (a kernel thread) */
	__u8 pad[5];
	char argv[SBX_ARGV_BYTES];
	char exe[SBX_EXE_DEPTH][SBX_NAME_BYTES]; /* innermost first */
};

/* The process record already sent for a thread group (sbx_procs, by tgid): still its own while
 * the group leader's start time (pid reuse) and the mm (exec) are the same. */
struct sbx_proc_seen {
	__u64 start_time;
	__u64 mm;
	__u64 id;
};

/* A packet the firewall logged (an NFLOG rule: its prefix says the verdict), as the packet was
 * when it passed the rule. */
struct sbx_packet {
	__u32 kind;     /* SBX_KIND_PACKET */
	__u32 uid;      /* the sending socket's owner; (__u32)-1 if the packet has no socket */
	__u64 seq;
	__u64 time_ns;  /* CLOCK_MONOTONIC */
	__u16 family;   /* AF_INET, AF_INET6 */
	__u16 protocol; /* IPPROTO_* of the transport header (IPv6: the first next header) */
	__u16 sport;    /* network byte order; 0 without ports */
	__u16 dport;
	__u16 ipid;     /* the IPv4 header's ID (network byte order); 0 for IPv6 */
	__u16 pad16;
	__u32 ppid;
	/* The process sending it, for a datagram (UDP, ICMP, raw) from a user's socket that is not
	 * connected (sendto() with an address): it leaves in the sending call. 0 otherwise: a
	 * connected socket's connect event says who, and TCP's packets may leave from a timer. */
	__u64 pid_tgid;
	__u64 proc;     /* its sbx_proc record (with pid_tgid) */
	__u8 src[16];
	__u8 dst[16];
	char prefix[SBX_PREFIX_BYTES];
};

/* What kind of change an sbx_fwchange is: an nf_tables transaction committed (iptables-nft,
 * nft), or a legacy x_tables table replaced (iptables-legacy and its kin, setsockopt) */
#define SBX_FW_NFT 1
#define SBX_FW_IPT 2  /* IPT_SO_SET_REPLACE, PF_INET */
#define SBX_FW_IP6T 3 /* IP6T_SO_SET_REPLACE, PF_INET6 */
#define SBX_FW_ARPT 4 /* ARPT_SO_SET_REPLACE */
#define SBX_FW_EBT 5  /* EBT_SO_SET_ENTRIES */

#define SBX_FW_OTHER_NETNS 1 /* flags: not the guest's own (initial) network namespace */

/* A change to the guest's netfilter rules that took effect, with the process that made it. Reads
 * (iptables-save, nft list) make none. */
struct sbx_fwchange {
	__u32 kind;     /* SBX_KIND_FWCHANGE */
	__u16 what;     /* SBX_FW_* */
	__u16 flags;    /* SBX_FW_OTHER_NETNS */
	__u64 seq;
	__u64 time_ns;  /* CLOCK_MONOTONIC when the change was done */
	__u64 pid_tgid; /* tgid << 32 | thread id */
	__u64 uid_gid;  /* gid << 32 | uid */
	__u64 proc;     /* the sbx_proc record of the process */
	__u32 ppid;
	__u32 netns;    /* the network namespace's inode number */
};

#endif
