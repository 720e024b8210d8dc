// SPDX-License-Identifier: GPL-2.0
/*
 * sbx-capture: loads connect.bpf.o and keeps it attached with no process of its own (its links
 * and maps pinned in bpffs), and drains its ring buffer when a collection asks.
 *
 *   sbx-capture load OBJECT   attach (nothing to do if it is attached already)
 *   sbx-capture check         exit 0 if attached; else say what is missing, exit 1
 *   sbx-capture drain FILE    append every event waiting in the ring buffer to FILE, one line
 *                             each (the process records they name kept in FILE.procs); print
 *                             the counters, the links found missing and both clocks on stdout
 *   sbx-capture unload        detach (the events not drained are gone)
 *   sbx-capture clock         print "@@captureclock MONO REAL": both clocks at one moment
 *   sbx-capture stream DIR PORT
 *                             every STREAM_MS, drain as `drain DIR/BOOT_ID.log` does (the file
 *                             a collection reads) and copy what that file gained to PORT (the host's file of a virtio-serial channel), with
 *                             what the drain printed: the host reads the last records there,
 *                             without SSH, when the sandbox is destroyed (see stream_round)
 *
 * A connect line: "c SEQ MONO_NS PID TID PPID UID RET FAMILY PROTOCOL ADDRESS PORT EXE ARGV"
 * (PROTOCOL: the socket's IP protocol number); EXE and ARGV escaped (bytes outside '!'..'~', and
 * '\', as \xNN; ARGV's NULs between arguments too); EXE is "-" when the process has none, and
 * starts with "..." when deeper than the record holds; ARGV is the process's at its first
 * connect.
 * A packet line: "f SEQ MONO_NS UID FAMILY PROTOCOL SRC SPORT DST DPORT IPID PREFIX PID TID PPID
 * EXE ARGV" (UID -1: no socket; PREFIX escaped; the sender, for a datagram from a user's socket,
 * as in a connect line: else PID 0 and EXE and ARGV "-").
 * A firewall change line: "w SEQ MONO_NS PID TID PPID UID WHAT NETNS EXE ARGV" (WHAT: nft, an
 * nf_tables commit; ipt, ip6t, arpt, ebt, a legacy table replaced; NETNS 0 for the guest's own
 * network namespace, else the other one's inode number; the process as in a connect line).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "event.h"

#define PIN_DIR "/sys/fs/bpf/sandbox"
#define PIN_EVENTS PIN_DIR "/sbx_events"
#define PIN_COUNTS PIN_DIR "/sbx_counts"
#define PIN_PROCS PIN_DIR "/sbx_procs"
#define PIN_LINK_TCP4 PIN_DIR "/link_sbx_connect_tcp4"
#define PIN_LINK_TCP6 PIN_DIR "/link_sbx_connect_tcp6"
#define PIN_LINK_DGRAM PIN_DIR "/link_sbx_connect_dgram"
#define PIN_LINK_NFT PIN_DIR "/link_sbx_packet_nft"
#define PIN_LINK_XT PIN_DIR "/link_sbx_packet_xt"
#define PIN_LINK_FW_NFT PIN_DIR "/link_sbx_fwchange_nft"
#define PIN_LINK_FW_XT PIN_DIR "/link_sbx_fwchange_xt"
#define PIN_LINK_FW_TABLES PIN_DIR "/link_sbx_fwchange_nft_tables"
#define PIN_COMMITS PIN_DIR "/sbx_commits"

static const char *const pins[] = {
	PIN_LINK_TCP4,  PIN_LINK_TCP6,      PIN_LINK_DGRAM, PIN_LINK_NFT, PIN_LINK_XT,
	PIN_LINK_FW_NFT, PIN_LINK_FW_TABLES, PIN_LINK_FW_XT, PIN_EVENTS,   PIN_COUNTS,
	PIN_PROCS,      PIN_COMMITS};
/* what `check` wants: all of these, and one of the two packet links */
static const char *const required[] = {
	PIN_LINK_TCP4,      PIN_LINK_TCP6,  PIN_LINK_DGRAM, PIN_LINK_FW_NFT,
	PIN_LINK_FW_TABLES, PIN_LINK_FW_XT, PIN_EVENTS,     PIN_COUNTS,
	PIN_PROCS};
#define REQUIRED (sizeof(required) / sizeof(required[0]))
#define PINS (sizeof(pins) / sizeof(pins[0]))

static int print_libbpf(enum libbpf_print_level level, const char *format, va_list args)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	return vfprintf(stderr, format, args);
}

static void escaped(FILE *out, const char *data, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)data[i];

		if (c < '!' || c > '~' || c == '\\')
			fprintf(out, "\\x%02x", c);
		else
			fputc(c, out);
	}
}

/* PROC: the process's executable and argv, as print_proc wrote them */
static void print_line(FILE *out, const struct sbx_event *e, const char *proc)
{
	char address[INET6_ADDRSTRLEN] = "?";

	inet_ntop(e->family == 2 ? AF_INET : AF_INET6, e->addr, address, sizeof(address));
	fprintf(out, "c %llu %llu %u %u %u %u %d %u %u %s %u %s\n", (unsigned long long)e->seq,
		(unsigned long long)e->time_ns, (unsigned)(e->pid_tgid >> 32),
		(unsigned)(e->pid_tgid & 0xffffffff), e->ppid, (unsigned)(e->uid_gid & 0xffffffff),
		e->ret, e->family == 2 ? 4 : 6, e->protocol, address, ntohs(e->port), proc);
}

/* A process record's "EXE ARGV", escaped: EXE "-" for none, starting with "..." when deeper
 * than the record holds; ARGV "-" when empty. */
static void print_proc(FILE *out, const struct sbx_proc *p)
{
	int depth = p->exe_depth & ~SBX_EXE_TRUNCATED;

	if (depth == 0 && !(p->exe_depth & SBX_EXE_TRUNCATED))
		fputc('-', out);
	if (p->exe_depth & SBX_EXE_TRUNCATED)
		fputs("...", out);
	for (int i = depth - 1; i >= 0 && i < SBX_EXE_DEPTH; i--) {
		fputc('/', out);
		escaped(out, p->exe[i], strnlen(p->exe[i], SBX_NAME_BYTES));
	}
	fputc(' ', out);
	if (p->argv_len == 0)
		fputc('-', out);
	escaped(out, p->argv, p->argv_len < SBX_ARGV_BYTES ? p->argv_len : SBX_ARGV_BYTES);
}

/* PROC as for print_line; "- -" when the packet's sender is not known */
static void print_packet(FILE *out, const struct sbx_packet *p, const char *proc)
{
	int af = p->family == 2 ? AF_INET : AF_INET6;
	char src[INET6_ADDRSTRLEN] = "?", dst[INET6_ADDRSTRLEN] = "?";

	inet_ntop(af, p->src, src, sizeof(src));
	inet_ntop(af, p->dst, dst, sizeof(dst));
	fprintf(out, "f %llu %llu %d %u %u %s %u %s %u %u ", (unsigned long long)p->seq,
		(unsigned long long)p->time_ns, (int)p->uid, p->family == 2 ? 4 : 6, p->protocol,
		src, ntohs(p->sport), dst, ntohs(p->dport), ntohs(p->ipid));
	escaped(out, p->prefix, strnlen(p->prefix, SBX_PREFIX_BYTES));
	fprintf(out, " %u %u %u %s\n", (unsigned)(p->pid_tgid >> 32),
		(unsigned)(p->pid_tgid & 0xffffffff), p->ppid, proc);
}

static const char *fwchange_what(__u16 what)
{
	switch (what) {
	case SBX_FW_NFT:
		return "nft";
	case SBX_FW_IPT:
		return "ipt";
	case SBX_FW_IP6T:
		return "ip6t";
	case SBX_FW_ARPT:
		return "arpt";
	case SBX_FW_EBT:
		return "ebt";
	}
	return "?";
}

/* PROC as for print_line */
static void print_fwchange(FILE *out, const struct sbx_fwchange *c, const char *proc)
{
	fprintf(out, "w %llu %llu %u %u %u %u %s %u %s\n", (unsigned long long)c->seq,
		(unsigned long long)c->time_ns, (unsigned)(c->pid_tgid >> 32),
		(unsigned)(c->pid_tgid & 0xffffffff), c->ppid, (unsigned)(c->uid_gid & 0xffffffff),
		fwchange_what(c->what), c->flags & SBX_FW_OTHER_NETNS ? c->netns : 0, proc);
}

/* The process records of this load of the capture, by id ("EXE ARGV"): kept in a file beside
 * the events file (a record is sent once, and the events naming it may come in later drains). */
struct procs {
	FILE *file;
	char **proc;
	size_t size;
};

static void procs_put(struct procs *procs, unsigned long long id, const char *proc)
{
	if (id >= procs->size) {
		size_t size = procs->size ? procs->size : 64;
		char **grown;

		while (size <= id)
			size *= 2;
		grown = realloc(procs->proc, size * sizeof(*grown));
		if (!grown)
			return;
		memset(grown + procs->size, 0, (size - procs->size) * sizeof(*grown));
		procs->proc = grown;
		procs->size = size;
	}
	free(procs->proc[id]);
	procs->proc[id] = strdup(proc);
}

/* Record ID's "EXE ARGV"; "- -" if this load sent no such record (or it was lost). */
static const char *procs_get(const struct procs *procs, __u64 id)
{
	const char *proc = id < procs->size ? procs->proc[id] : NULL;

	return proc ? proc : "- -";
}

/* Opens PATH for appending, with the records already in it if they are this load's (the ring
 * buffer's map id, its first line, says whose they are); else starts it afresh. */
static int procs_open(struct procs *procs, const char *path, unsigned int ring)
{
	char line[8192];
	unsigned long long id;
	int start;
	unsigned int owner = 0;
	FILE *in = fopen(path, "r");

	memset(procs, 0, sizeof(*procs));
	if (in) {
		if (fgets(line, sizeof(line), in) && sscanf(line, "ring %u", &owner) == 1 &&
		    owner == ring) {
			while (fgets(line, sizeof(line), in)) {
				line[strcspn(line, "\n")] = 0;
				if (sscanf(line, "%llu %n", &id, &start) == 1 && id < (1ULL << 32))
					procs_put(procs, id, line + start);
			}
		} else {
			owner = 0;
		}
		fclose(in);
	}
	procs->file = fopen(path, owner == ring ? "a" : "w");
	if (!procs->file)
		return -1;
	if (owner != ring)
		fprintf(procs->file, "ring %u\n", ring);
	return 0;
}

struct drain {
	FILE *out;
	struct procs procs;
};

static int print_event(void *ctx, void *data, size_t size)
{
	struct drain *drain = ctx;
	__u32 kind = size >= sizeof(__u32) ? *(__u32 *)data : 0;

	if (kind == SBX_KIND_CONNECT && size >= sizeof(struct sbx_event)) {
		const struct sbx_event *e = data;

		print_line(drain->out, e, procs_get(&drain->procs, e->proc));
	} else if (kind == SBX_KIND_PACKET && size >= sizeof(struct sbx_packet)) {
		const struct sbx_packet *p = data;

		print_packet(drain->out, p, p->pid_tgid ? procs_get(&drain->procs, p->proc) : "- -");
	} else if (kind == SBX_KIND_FWCHANGE && size >= sizeof(struct sbx_fwchange)) {
		const struct sbx_fwchange *c = data;

		print_fwchange(drain->out, c, procs_get(&drain->procs, c->proc));
	} else if (kind == SBX_KIND_PROC && size >= sizeof(struct sbx_proc)) {
		const struct sbx_proc *p = data;
		char *proc = NULL;
		size_t len = 0;
		FILE *text = open_memstream(&proc, &len);

		if (!text)
			return 0;
		print_proc(text, p);
		fclose(text);
		if (p->id < (1ULL << 32))
			procs_put(&drain->procs, p->id, proc);
		fprintf(drain->procs.file, "%llu %s\n", (unsigned long long)p->id, proc);
		free(proc);
	}
	return 0;
}

/* Whether a function is in the running kernel (and its loaded modules). */
static int kernel_has(const char *function)
{
	char line[512], name[256];
	FILE *symbols = fopen("/proc/kallsyms", "r");
	int found = 0;

	if (!symbols)
		return 0;
	while (!found && fgets(line, sizeof(line), symbols))
		found = sscanf(line, "%*s %*s %255s", name) == 1 && strcmp(name, function) == 0;
	fclose(symbols);
	return found;
}

/* 0 if every pin `load` makes is there (one of the two packet links); else 1, and, unless
 * `report` is NULL, a line on OUT for each one missing: REPORT and the pin's name (in
 * PIN_DIR; "link_sbx_packet" for both packet links). */
static int check(FILE *out, const char *report)
{
	int missing = 0, fd;

	for (size_t i = 0; i < REQUIRED; i++) {
		fd = bpf_obj_get(required[i]);
		if (fd < 0) {
			if (report)
				fprintf(out, "%s%s\n", report, required[i] + sizeof(PIN_DIR));
			missing = 1;
		} else {
			close(fd);
		}
	}
	fd = bpf_obj_get(PIN_LINK_NFT);
	if (fd < 0)
		fd = bpf_obj_get(PIN_LINK_XT);
	if (fd < 0) {
		if (report)
			fprintf(out, "%slink_sbx_packet\n", report);
		missing = 1;
	} else {
		close(fd);
	}
	return missing;
}

static int load(const char *path)
{
	struct bpf_object *obj;
	struct bpf_program *prog;
	struct bpf_link *link;
	int err, packets;

	if (check(stdout, NULL) == 0)
		return 0;
	obj = bpf_object__open_file(path, NULL);
	if (!obj) {
		fprintf(stderr, "sbx-capture: cannot open %s: %s\n", path, strerror(errno));
		return 1;
	}
	/* The firewall's NFLOG rules run as nft's `log` or as the xtables target, whichever
	 * iptables-nft chose (the boot rules loaded its module): attach to the one there is. */
	packets = 0;
	bpf_object__for_each_program(prog, obj) {
		const char *target = strchr(bpf_program__section_name(prog), '/');

		if (strncmp(bpf_program__name(prog), "sbx_packet", 10) != 0)
			continue;
		if (target && kernel_has(target + 1))
			packets++;
		else
			bpf_program__set_autoload(prog, false);
	}
	if (packets == 0) {
		fprintf(stderr, "sbx-capture: neither nft_log_eval nor nflog_tg is in the kernel: "
				"the firewall's NFLOG rules are not loaded\n");
		return 1;
	}
	err = bpf_object__load(obj);
	if (err) {
		fprintf(stderr, "sbx-capture: the kernel refused %s: %s\n", path, strerror(-err));
		return 1;
	}
	if (mkdir(PIN_DIR, 0700) && errno != EEXIST) {
		fprintf(stderr, "sbx-capture: mkdir %s: %s\n", PIN_DIR, strerror(errno));
		return 1;
	}
	/* pins from an earlier, half-done load would hold the wrong maps: start afresh */
	for (size_t i = 0; i < PINS; i++)
		unlink(pins[i]);
	err = bpf_object__pin_maps(obj, PIN_DIR);
	if (err) {
		fprintf(stderr, "sbx-capture: pinning the maps: %s\n", strerror(-err));
		return 1;
	}
	bpf_object__for_each_program(prog, obj) {
		char pin[256];

		if (!bpf_program__autoload(prog))
			continue;
		link = bpf_program__attach(prog);
		if (!link) {
			fprintf(stderr, "sbx-capture: attaching %s: %s\n", bpf_program__name(prog),
				strerror(errno));
			return 1;
		}
		snprintf(pin, sizeof(pin), PIN_DIR "/link_%s", bpf_program__name(prog));
		err = bpf_link__pin(link, pin);
		if (err) {
			fprintf(stderr, "sbx-capture: pinning %s: %s\n", pin, strerror(-err));
			return 1;
		}
	}
	return 0;
}

/* Both clocks at one moment: event times are CLOCK_MONOTONIC. */
static void print_clock(FILE *out)
{
	struct timespec mono, real;

	clock_gettime(CLOCK_MONOTONIC, &mono);
	clock_gettime(CLOCK_REALTIME, &real);
	fprintf(out, "@@captureclock %lld.%09ld %lld.%09ld\n", (long long)mono.tv_sec, mono.tv_nsec,
	       (long long)real.tv_sec, real.tv_nsec);
}

/* Drains the ring buffer into PATH (and PATH.procs) and writes the counters, the links found
 * missing and both clocks to REPORT. Holds an exclusive lock on PATH meanwhile: `stream` and a
 * collection's `drain` both drain, and one ring buffer has one consumer position. */
static int drain_to(const char *path, FILE *report)
{
	struct ring_buffer *ring;
	struct bpf_map_info info;
	__u32 info_len = sizeof(info);
	struct drain state;
	char procs_path[4096];
	int events, counts, n, err, lock;
	__u64 values[SBX_COUNTERS] = {0};

	events = bpf_obj_get(PIN_EVENTS);
	counts = bpf_obj_get(PIN_COUNTS);
	if (events < 0 || counts < 0) {
		fprintf(report, "@@capture missing\n");
		if (events >= 0)
			close(events);
		if (counts >= 0)
			close(counts);
		return 0;
	}
	lock = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (lock < 0 || flock(lock, LOCK_EX)) {
		fprintf(stderr, "sbx-capture: cannot lock %s: %s\n", path, strerror(errno));
		return 1;
	}
	err = 1;
	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(events, &info, &info_len)) {
		fprintf(stderr, "sbx-capture: cannot identify the ring buffer: %s\n", strerror(errno));
		goto out;
	}
	snprintf(procs_path, sizeof(procs_path), "%s.procs", path);
	if (procs_open(&state.procs, procs_path, info.id)) {
		fprintf(stderr, "sbx-capture: cannot open %s: %s\n", procs_path, strerror(errno));
		goto out;
	}
	state.out = fopen(path, "a");
	if (!state.out) {
		fprintf(stderr, "sbx-capture: cannot open %s: %s\n", path, strerror(errno));
		fclose(state.procs.file);
		goto out;
	}
	ring = ring_buffer__new(events, print_event, &state, NULL);
	if (!ring) {
		fprintf(stderr, "sbx-capture: cannot read the ring buffer: %s\n", strerror(errno));
		fclose(state.out);
		fclose(state.procs.file);
		goto out;
	}
	n = ring_buffer__consume(ring);
	ring_buffer__free(ring);
	for (size_t i = 0; i < state.procs.size; i++)
		free(state.procs.proc[i]);
	free(state.procs.proc);
	err = fclose(state.procs.file);
	if (fclose(state.out) || err) {
		fprintf(stderr, "sbx-capture: writing %s: %s\n", path, strerror(errno));
		err = 1;
		goto out;
	}
	for (__u32 i = 0; i < SBX_COUNTERS; i++)
		bpf_map_lookup_elem(counts, &i, &values[i]);
	fprintf(report, "@@capture ok %d %llu %llu %llu %llu %llu %llu\n", n,
		(unsigned long long)values[SBX_COUNT_SEQ],
		(unsigned long long)values[SBX_COUNT_DROPPED],
		(unsigned long long)values[SBX_COUNT_PACKETS],
		(unsigned long long)values[SBX_COUNT_PACKETS_DROPPED],
		(unsigned long long)values[SBX_COUNT_FWCHANGES],
		(unsigned long long)values[SBX_COUNT_FWCHANGES_DROPPED]);
	/* a link unpinned alone (guest root) detaches its program and nothing else: say which */
	check(report, "@@capturepartial ");
	err = n < 0;
out:
	close(lock);
	close(events);
	close(counts);
	return err;
}

static int drain(const char *path)
{
	int err = drain_to(path, stdout);

	print_clock(stdout);
	return err;
}

/* How often `stream` drains (the capture's records wake no one: BPF_RB_NO_WAKEUP), and the
 * most of FILE one round copies (the rest goes in the next rounds). */
#define STREAM_MS 100
#define STREAM_CHUNK (256 * 1024)
#define STREAM_CHECK 10
#define STREAM_READY "/run/sandbox-capture-stream"

/* The ring buffer's two positions, mapped read-only: a round with nothing new in it does not
 * drain (a drain opens and maps everything again: under TCG a round would cost a core's tenth). */
struct watch {
	__u32 id;
	volatile __u64 *consumer, *producer;
};

/* Whether the ring buffer holds records not drained yet (or is not there: a drain says so). */
static int ring_has_data(struct watch *w)
{
	struct bpf_map_info info;
	__u32 info_len = sizeof(info);
	long page = sysconf(_SC_PAGESIZE);
	int fd = bpf_obj_get(PIN_EVENTS);

	memset(&info, 0, sizeof(info));
	if (fd < 0 || bpf_obj_get_info_by_fd(fd, &info, &info_len)) {
		if (fd >= 0)
			close(fd);
		return 1;
	}
	if (info.id != w->id) {
		if (w->consumer)
			munmap((void *)w->consumer, page);
		if (w->producer)
			munmap((void *)w->producer, page);
		w->consumer = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, 0);
		w->producer = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, page);
		if (w->consumer == MAP_FAILED || w->producer == MAP_FAILED) {
			w->consumer = w->producer = NULL;
			w->id = 0;
			close(fd);
			return 1;
		}
		w->id = info.id;
	}
	close(fd);
	return __atomic_load_n(w->consumer, __ATOMIC_ACQUIRE) !=
	       __atomic_load_n(w->producer, __ATOMIC_ACQUIRE);
}

/* One round of `stream`: drain when there is something to drain (and every STREAM_CHECK
 * rounds: the drain's report says whether every link is still there), then on PORT
 *   the drain's report ("@@capture ...", "@@capturepartial ...")
 *   "@@file INODE 0"          when FILE is another file than the round before (or shrank)
 *   "@@data OFFSET LEN"       and LEN bytes of FILE from OFFSET, and a newline (what it gained)
 *   "@@file INODE SENT"       every STREAM_CHECK rounds: which file, copied up to where (virtlogd
 *                             rotates the host's file away: what is left must say it again)
 *   "@@captureclock MONO REAL", "@@round N BOOT_ID LEFT" (LEFT: bytes of FILE not copied yet,
 *                             past what one round copies)
 * A round is complete once its "@@round" line is there; the report holds until another one. */
static void stream_round(const char *path, FILE *port, unsigned long long round, off_t *sent,
			 ino_t *inode, const char *boot_id, struct watch *w)
{
	static char buffer[65536];
	struct stat st;
	off_t left, behind = 0;
	int fd;

	if (round % STREAM_CHECK == 1 || ring_has_data(w))
		drain_to(path, port);
	if (stat(path, &st) == 0 && (st.st_ino != *inode || st.st_size != *sent)) {
		if (st.st_ino != *inode || st.st_size < *sent) {
			*inode = st.st_ino;
			*sent = 0;
			fprintf(port, "@@file %llu 0\n", (unsigned long long)st.st_ino);
		}
		fd = open(path, O_RDONLY | O_CLOEXEC);
		left = st.st_size - *sent;
		if (left > STREAM_CHUNK)
			left = STREAM_CHUNK;
		while (fd >= 0 && left > 0) {
			ssize_t n = pread(fd, buffer, left < (off_t)sizeof(buffer) ? (size_t)left
									   : sizeof(buffer),
					  *sent);

			if (n <= 0)
				break;
			fprintf(port, "@@data %lld %zd\n", (long long)*sent, n);
			fwrite(buffer, 1, (size_t)n, port);
			fputc('\n', port);
			*sent += n;
			left -= n;
		}
		if (fd >= 0)
			close(fd);
		behind = st.st_size > *sent ? st.st_size - *sent : 0;
	}
	if (round % STREAM_CHECK == 1 && *inode)
		fprintf(port, "@@file %llu %lld\n", (unsigned long long)*inode, (long long)*sent);
	print_clock(port);
	fprintf(port, "@@round %llu %s %lld\n", round, boot_id, (long long)behind);
	fflush(port);
}

static int stream(const char *dir, const char *port_path)
{
	char boot_id[64] = "", path[4096];
	FILE *port = NULL, *f;
	off_t sent = 0;
	ino_t inode = 0;
	struct watch watch = {0};
	struct timespec pause = {0, STREAM_MS * 1000000L};

	f = fopen("/proc/sys/kernel/random/boot_id", "r");
	if (!f || !fgets(boot_id, sizeof(boot_id), f)) {
		fprintf(stderr, "sbx-capture: cannot read the boot id\n");
		return 1;
	}
	fclose(f);
	boot_id[strcspn(boot_id, "\n")] = 0;
	snprintf(path, sizeof(path), "%s/%s.log", dir, boot_id);
	for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
		*slash = 0;
		/* as the collection's `mkdir -p`: /var/lib/sandbox holds what runs need too */
		if (mkdir(path, 0755) && errno != EEXIST) {
			fprintf(stderr, "sbx-capture: mkdir %s: %s\n", path, strerror(errno));
			return 1;
		}
		*slash = '/';
	}
	/* the port's device comes with udev, maybe after this starts */
	for (int i = 0; i < 600 && !port; i++) {
		port = fopen(port_path, "w");
		if (!port)
			nanosleep(&pause, NULL);
	}
	if (!port) {
		fprintf(stderr, "sbx-capture: cannot open %s: %s\n", port_path, strerror(errno));
		return 1;
	}
	setvbuf(port, NULL, _IOFBF, 1 << 16);
	f = fopen(STREAM_READY, "w");
	if (f)
		fclose(f);
	for (unsigned long long round = 1;; round++) {
		stream_round(path, port, round, &sent, &inode, boot_id, &watch);
		if (ferror(port)) {
			fprintf(stderr, "sbx-capture: writing %s failed\n", port_path);
			return 1;
		}
		nanosleep(&pause, NULL);
	}
}

static int unload(void)
{
	for (size_t i = 0; i < PINS; i++)
		unlink(pins[i]);
	return 0;
}

int main(int argc, char **argv)
{
	libbpf_set_print(print_libbpf);
	if (argc == 3 && strcmp(argv[1], "load") == 0)
		return load(argv[2]);
	if (argc == 2 && strcmp(argv[1], "check") == 0)
		return check(stdout, "missing " PIN_DIR "/");
	if (argc == 3 && strcmp(argv[1], "drain") == 0)
		return drain(argv[2]);
	if (argc == 2 && strcmp(argv[1], "unload") == 0)
		return unload();
	if (argc == 4 && strcmp(argv[1], "stream") == 0)
		return stream(argv[2], argv[3]);
	if (argc == 2 && strcmp(argv[1], "clock") == 0) {
		print_clock(stdout);
		return 0;
	}
	fprintf(stderr, "usage: sbx-capture load OBJECT | check | drain FILE | unload | clock | "
			"stream FILE PORT\n");
	return 2;
}
