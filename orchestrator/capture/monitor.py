"""Connection attempts in the guest: captured from the kernel's own events, collected over SSH,
joined into `records.Attempt`s.

One eBPF capture (images/capture/connect.bpf.c, attached at boot by `sbx-capture load`) writes
three kinds of record into a ring buffer in the guest's kernel, each at the moment it happens:
- the firewall's: every packet an NFLOG rule of orchestrator/egress/firewall.py logs (SBX-ALLOW,
  SBX-BLOCK, SBX-DNS for the first packet of a flow, SBX-ALLOW-EST and SBX-DNS-EST for the next
  ones of an answered UDP flow; the boot rules' SBX-BOOT), taken where the rule runs (nft's
  `log` expression or the xtables NFLOG target, whichever iptables-nft chose): the verdict (the
  rule's prefix), protocol, addresses, ports, IPv4 ID, the socket owner's uid and, for a
  datagram sent with no connect() (UDP, ICMP or raw sendto(); it leaves in the sending call),
  the process that sent it. Nothing listens on the NFLOG group, so the packet costs nothing more.
- the process's: every connect to an inet or inet6 address, as the protocol makes it (TCP's
  sends the SYN, a datagram socket's picks the route): which process (pid, parent, uid,
  executable and argv, read once per process image), the socket's protocol and the result. A
  blocking connect() that waits (its SYN gets no answer: minutes) is recorded before it waits.
- the rules': every change to the guest's netfilter rules that took effect (an nf_tables
  commit that changed something: iptables-nft, nft; a legacy x_tables table replaced:
  iptables-legacy and its kin), with the process that made it. Reads (iptables-save) make none.
  Those of `up`'s own push of the policy (up to the Mark `start` returns, which the cursor
  keeps) are ours; every later one is a `tamper` row naming the process, even when the rules
  were put back before the next collection.
Nothing reads the ring buffer while the software runs; each collection drains it into a file of
the guest (`sbx-capture drain`, one line per record) and reads that file from where the last
collection ended: each record exactly once. A full buffer counts what it drops, and the
collection reports it. A TCP connect's result is 0 for allowed and blocked alike (the SYN went
out; what became of it, the protocol's connect does not wait to see): the verdict always comes
from the firewall record.

A firewall record is joined with the connect event of the same destination address, port and
protocol (and uid), in time order, within JOIN_WINDOW (see join() for records that may not be
attempts). Parsing and joining are pure functions of the text the guest returns; `collect` is
the one side effect: one SSH command per collection.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import json
import logging
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from orchestrator.capture.records import (
    Attempt,
    DnsQuery,
    Verdict,
    guest_seconds,
    iso_time,
    parse_time,
)
from orchestrator.egress import firewall
from orchestrator.errors import GuestError, SandboxError
from orchestrator.vm.hostfiles import LOCAL, HostFiles

if TYPE_CHECKING:
    from orchestrator.vm.guest import Guest

log = logging.getLogger(__name__)

# In the image (images/customize.sh installs them from images/capture/).
CAPTURE_TOOL = "/usr/sbin/sbx-capture"
CAPTURE_OBJECT = "/usr/lib/sandbox/connect.bpf.o"
# sandbox-capture-stream.service's sign that it copies the records to the host (sbx-capture.c
# STREAM_READY): an image from before it has none.
STREAM_READY = "/run/sandbox-capture-stream"
# Drained events, one file per boot (the ring buffer and its sequence start again at each boot).
EVENTS_DIR = "/var/lib/sandbox/capture"

# The second flag: a packet of a flow conntrack already knew (firewall.LOG_ALLOW_EST), never an
# attempt by itself, only with a connect() of its own.
_PREFIXES: dict[str, tuple[Verdict, bool]] = {
    firewall.LOG_ALLOW: (Verdict.ALLOWED, False),
    firewall.LOG_BLOCK: (Verdict.BLOCKED, False),
    firewall.LOG_DNS: (Verdict.DNS, False),
    firewall.LOG_BOOT: (Verdict.BOOT, False),
    firewall.LOG_ALLOW_EST: (Verdict.ALLOWED, True),
    firewall.LOG_DNS_EST: (Verdict.DNS, True),
}

# A firewall record and its connect event are taken within one syscall, on one clock (a TCP
# SYN's record comes first: the event is taken when tcp_v4_connect returns, the SYN sent).
JOIN_WINDOW = 2.0
# A UDP connect()'s first datagram, or a firewall record's connect event, may come in the next
# collection (a datagram sent later; a drain between the two): records and events younger than
# this at collection time wait for the next collection (kept in the cursor) before they go out
# alone.
SETTLE_SECONDS = 3.0
# TCP retries its SYN (and a blocked UDP flow resends) as long as this; every copy is NEW to
# conntrack and logged again: they are the same attempt.
FLOW_MEMORY_SECONDS = 180.0
# glibc's getaddrinfo sorts a lookup's two or more answers (RFC 6724) by connecting a UDP
# socket to each address in turn, with the port asked for, right after the answer and in the
# thread that asked, and sends nothing: its connects come this close together.
PROBE_BURST_SECONDS = 1.0

COLLECT_TIMEOUT = 120.0
# At most this much of the guest's events file per collection (guest root can make it any
# size); the rest waits for the next one.
EVENTS_CHUNK_BYTES = 16 << 20
START_TIMEOUT = 60.0

# Each packet a socket sends takes the next IPv4 ID; a little slack for packets that were not
# logged. A new socket on the same flow starts at a random ID: 4 in 65536 look like a resend.
_RESEND_ID_STEP = 4
_RESEND_MIN_SECONDS = 0.5
_EINPROGRESS = -115
# 0, or connect(2)'s EINPROGRESS, EALREADY, EISCONN (what the capture saw when it hooked the
# syscall: the samples in tests/ keep them)
_NOT_REFUSED = {0, _EINPROGRESS, -114, -106}

START_HINT = (
    "the guest image may predate connection capture with eBPF: rebuild it with "
    "`sandbox image build --force` and create the sandbox again"
)

# The image's sandbox-capture.service loads the program at boot, before the network is up; this
# attaches it if guest root or a failed boot step left it out (`load` does nothing when it is
# attached), then checks.
START_SCRIPT = f"""\
set -u
{CAPTURE_TOOL} load {CAPTURE_OBJECT} || exit 1
{CAPTURE_TOOL} check >&2 || {{ echo "the connect() capture is not attached" >&2; exit 1; }}
test -e {STREAM_READY} || {{ echo "the capture's copy to the host is not going" >&2; exit 1; }}
read -r boot < /proc/sys/kernel/random/boot_id; echo "@@boot $boot"
{CAPTURE_TOOL} clock
"""
START_COMMAND: list[str] = ["sh", "-c", START_SCRIPT]


@dataclass(frozen=True)
class Mark:
    """A moment of one guest boot, on the capture's clock (CLOCK_MONOTONIC). The firewall changes
    of that boot up to it are `up`'s own: its push of the policy (the boot's default rules are
    loaded before the capture is). The clock only goes forward and the kernel stamps each
    record: a later change cannot take an earlier time (guest root can make the records lie
    only by changing the kernel itself)."""

    boot_id: str
    mono_ns: int


_MONO = re.compile(r"([0-9]{1,12})\.([0-9]{9})")


def parse_mark(text: str) -> Mark:
    """START_SCRIPT's output: `@@boot ID` and `@@captureclock MONO REAL`."""
    boot_id, mono = "", None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == _BOOT:
            boot_id = parts[1][:64]
        elif len(parts) == 3 and parts[0] == _CAPTURE_CLOCK:
            mono = _MONO.fullmatch(parts[1])
    if not boot_id or mono is None:
        raise GuestError(
            f"the guest's capture did not say its boot and clock: {text[-200:]!r}", START_HINT
        )
    return Mark(boot_id, int(mono.group(1)) * 1_000_000_000 + int(mono.group(2)))


def started(status: int, output: str) -> Mark:
    """`start`'s result from START_SCRIPT run by another command (its exit status, and its
    stdout and stderr together)."""
    if status != 0:
        raise GuestError(f"could not start connection capture: {output.strip()[-300:]}", START_HINT)
    try:
        return parse_mark(output)
    except GuestError as error:
        raise GuestError(
            f"could not start connection capture: {error.message}", START_HINT
        ) from None


# ---- the collection command ------------------------------------------------------------------

# Section markers on lines of their own; the awk filters keep every other line away from them.
_BOOT, _CAPTURE, _EVENTS_POS, _CLOCK, _EVENTS, _END = (
    "@@boot",
    "@@capture",
    "@@eventspos",
    "@@clock",
    "@@events",
    "@@end",
)
_CAPTURE_CLOCK = "@@captureclock"
# A link of the capture the drain found unpinned (its program detached), one line each.
_CAPTURE_PARTIAL = "@@capturepartial"
_PIN_NAME = re.compile(r"[a-z0-9_]{1,64}")


def events_script(inode: int, offset: int) -> str:
    """Shell that drains the ring buffer into this boot's events file, prints what the drain
    said (`@@capture ok|missing ...`, `@@capturepartial LINK`, `@@captureclock`), `@@eventspos
    INODE SIZE`, then under `@@events` the file from byte `offset` (of the file `inode`; another
    file, or a shorter one, is read whole). A capture found missing, whole or in part, is loaded
    again, for what follows."""
    return f"""\
d={EVENTS_DIR}; f="$d/$(cat /proc/sys/kernel/random/boot_id).log"; mkdir -p "$d"
drained=$({CAPTURE_TOOL} drain "$f" 2>&1); echo "$drained"
case "$drained" in
  *"{_CAPTURE} missing"*|*"{_CAPTURE_PARTIAL} "*)
    {CAPTURE_TOOL} load {CAPTURE_OBJECT} >/dev/null 2>&1 ;;
esac
set -- $(stat -c '%i %s' "$f" 2>/dev/null || echo 0 0); off={offset}
[ "$1" = {inode} ] && [ "$2" -ge "$off" ] || off=0
n=$(($2 - off)); [ "$n" -le {EVENTS_CHUNK_BYTES} ] || n={EVENTS_CHUNK_BYTES}; t=$(mktemp); end=$off
if [ "$n" -gt 0 ]; then
  tail -c +$((off + 1)) "$f" | head -c "$n" > "$t"; n=$(wc -c < "$t")
  # Cut a chunk that stops inside a line back to its last whole line, unless the line is
  # longer than the chunk: then it is skipped (read as garbage).
  keep=$n
  if [ "$n" -gt 0 ] && [ "$(tail -c 1 "$t" | od -An -c | tr -d ' ')" != '\\n' ]; then
    part=$(($(tail -n 1 "$t" | wc -c))); [ "$part" -ge "$n" ] || keep=$((n - part))
  fi
  end=$((off + keep))
fi
echo "{_EVENTS_POS} $1 $end $2"
echo {_EVENTS}
head -c $((end - off)) "$t"; echo; rm -f "$t"
"""


def collect_script(cursor: Cursor) -> str:
    """The one shell command a collection runs in the guest (as root)."""
    return "\n".join(
        [
            "export LC_ALL=C",
            f'echo "{_BOOT} $(cat /proc/sys/kernel/random/boot_id)"',
            events_script(cursor.events_inode, cursor.events_offset),
            'read up idle < /proc/uptime; echo "' + _CLOCK + ' $(date +%s.%N) $up"',
            f"echo {_END}",
        ]
    )


# ---- raw records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FirewallRecord:
    seq: int  # the capture's count of firewall records (starts again when it is loaded again)
    time: float  # wall clock, epoch seconds (converted from CLOCK_MONOTONIC)
    verdict: Verdict
    proto: str
    family: int
    src: str | None
    dst: str
    sport: int | None
    dport: int | None
    uid: int | None
    ident: int | None = None  # the IPv4 header's ID
    # A packet of a flow conntrack already knew (SBX-ALLOW-EST, SBX-DNS-EST): a new socket that
    # reuses the flow, or the flow's own next datagram.
    established: bool = False
    # An attempt only if a connect of its own is left over for it: a flow already logged (maybe a
    # resent packet, maybe a new connect that reuses the port), or an established one.
    retry: bool = False
    mono_ns: int = 0  # CLOCK_MONOTONIC when the rule logged it
    # The process that sent it, for a datagram from a user's socket with no connect() (it left
    # in the sending call); None otherwise: a connect event says who (TCP, a connected socket),
    # or the kernel sent it.
    pid: int | None = None
    ppid: int | None = None
    exe: str | None = None
    cmdline: str | None = None

    @property
    def key(self) -> str:
        """Unique within a boot, even across a capture loaded again (its seq starts again)."""
        return f"{self.seq}-{self.mono_ns}"

    def flow(self) -> str:
        return f"{self.proto} {self.src} {self.sport} {self.dst} {self.dport}"


@dataclass(frozen=True)
class ConnectEvent:
    """One connect to an inet or inet6 address, as the eBPF program saw it when the protocol's
    connect returned."""

    seq: int  # the program's own count (starts again when it is loaded again)
    mono_ns: int  # CLOCK_MONOTONIC then, nanoseconds
    tid: int
    time: float  # the same moment, guest wall clock, epoch seconds
    family: int  # 4 | 6 (IPv4-mapped IPv6 addresses count as 4: that is what leaves the guest)
    proto: str  # the socket's protocol, as the firewall names it ("tcp", "udp", ...; "": unknown)
    dst: str
    dport: int
    exit: int  # what the protocol's connect returned: 0 or -errno
    pid: int | None
    ppid: int | None
    uid: int | None
    exe: str | None
    cmdline: str | None

    @property
    def key(self) -> str:
        """Unique within a boot, even across a capture loaded again (its seq starts at 0 again):
        one thread makes one connect per nanosecond at most."""
        return f"{self.mono_ns}-{self.tid}-{self.seq}"


@dataclass(frozen=True)
class FirewallChange:
    """A change to the guest's netfilter rules that took effect, as the kernel made it."""

    seq: int  # the capture's count of changes (starts again when it is loaded again)
    mono_ns: int  # CLOCK_MONOTONIC then
    time: float  # the same moment, guest wall clock, epoch seconds
    what: str  # a key of FIREWALL_CHANGES
    netns: int  # 0: the guest's own network namespace; else another one's inode number
    pid: int
    tid: int
    ppid: int
    uid: int
    exe: str | None
    cmdline: str | None

    @property
    def key(self) -> str:
        """Unique within a boot, as ConnectEvent.key."""
        return f"{self.mono_ns}-{self.tid}-{self.seq}"

    def describe(self) -> str:
        """The tamper row's evidence: what changed, and who (guest text, escaped where shown)."""
        where = (
            "the guest's firewall"
            if self.netns == 0
            else f"a firewall in another network namespace of the guest (inode {self.netns}), "
            "not the one its traffic passes,"
        )
        who = f"{self.exe or '?'} (pid {self.pid}, parent {self.ppid}, uid {self.uid})"
        command = f": {self.cmdline}" if self.cmdline else ""
        return f"{where} was changed ({FIREWALL_CHANGES[self.what]}) by {who}{command}"


# What sbx-capture calls each kind of change → how a row says it.
FIREWALL_CHANGES = {
    "nft": "nftables commit",
    "ipt": "legacy iptables table replaced",
    "ip6t": "legacy ip6tables table replaced",
    "arpt": "legacy arptables table replaced",
    "ebt": "legacy ebtables table replaced",
}


_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")
# IP protocol numbers (a socket's sk_protocol) → the firewall log's names.
_PROTO_NUMBERS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 136: "udplite", 132: "sctp"}


_INT = re.compile(r"-?[0-9]{1,19}")


def _int(value: str | None) -> int | None:
    # The guest's word: "²", "1e9" or 5000 digits are not counts (and int() of some raises).
    if value is None or not _INT.fullmatch(value):
        return None
    return int(value)


def _unescape(text: str) -> bytes:
    """sbx-capture's escaping (bytes outside '!'..'~', and '\\', as \\xNN) undone."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii", "replace"))


def decode_argv(text: str) -> str | None:
    """The argv sbx-capture printed (NUL-separated, escaped; `-` for none) as a shell-quoted
    line. The capture keeps at most the first 128 bytes, as they were at the process's first
    connect."""
    if text == "-":
        return None
    raw = _unescape(text).decode("utf-8", "replace")
    return shlex.join(arg for arg in raw.split("\0") if arg) or None


def _exe(text: str) -> str | None:
    """The executable's path sbx-capture printed (escaped; `-` for none)."""
    return None if text == "-" else _unescape(text).decode("utf-8", "replace")


def parse_event_line(line: str, mono_offset: float) -> ConnectEvent | None:
    """One line of the events file (images/capture/sbx-capture.c: `c SEQ MONO_NS PID TID PPID
    UID RET FAMILY PROTOCOL ADDRESS PORT EXE ARGV`); None if it is not one. mono_offset: wall
    clock minus CLOCK_MONOTONIC, in seconds."""
    parts = line.split(" ")
    if len(parts) != 14 or parts[0] != "c":
        return None
    numbers = [_int(p) for p in parts[1:10]]
    port = _int(parts[11])
    if any(n is None for n in numbers) or port is None:
        return None
    seq, mono_ns, pid, tid, ppid, uid, ret, _family, protocol = (n or 0 for n in numbers)
    try:
        address = ipaddress.ip_address(parts[10])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return ConnectEvent(
        seq=seq,
        mono_ns=mono_ns,
        tid=tid,
        time=mono_offset + mono_ns / 1e9,
        family=address.version,
        proto=_PROTO_NUMBERS.get(protocol, str(protocol) if protocol else ""),
        dst=str(address),
        dport=port,
        exit=ret,
        pid=pid,
        ppid=ppid,
        uid=uid,
        exe=_exe(parts[12]),
        cmdline=decode_argv(parts[13]),
    )


def parse_packet_line(line: str, mono_offset: float) -> FirewallRecord | None:
    """One firewall record of the events file (images/capture/sbx-capture.c: `f SEQ MONO_NS UID
    FAMILY PROTOCOL SRC SPORT DST DPORT IPID PREFIX PID TID PPID EXE ARGV`, or without the sender
    as an earlier capture wrote it); None if it is not one of ours."""
    parts = line.split(" ")
    if len(parts) not in (12, 17) or parts[0] != "f":
        return None
    sender = [_int(p) for p in parts[12:15]] if len(parts) == 17 else [0, 0, 0]
    if any(n is None for n in sender):
        return None
    pid, _tid, ppid = (n or 0 for n in sender)
    prefix = _unescape(parts[11]).decode("ascii", "replace")
    kind = next((v for p, v in _PREFIXES.items() if prefix == p), None)
    numbers = [_int(p) for p in (*parts[1:6], parts[7], parts[9], parts[10])]
    if kind is None or any(n is None for n in numbers):
        return None
    seq, mono_ns, uid, _family, protocol, sport, dport, ident = (n or 0 for n in numbers)
    try:
        src = ipaddress.ip_address(parts[6])
        dst = ipaddress.ip_address(parts[8])
    except ValueError:
        return None
    verdict, established = kind
    proto = _PROTO_NUMBERS.get(protocol, str(protocol))
    ports = proto in ("tcp", "udp", "udplite", "sctp")
    return FirewallRecord(
        seq=seq,
        time=mono_offset + mono_ns / 1e9,
        verdict=verdict,
        proto=proto,
        family=dst.version,
        src=str(src),
        dst=str(dst),
        sport=sport if ports else None,
        dport=dport if ports else None,
        uid=None if uid < 0 else uid,
        ident=ident if dst.version == 4 else None,
        established=established,
        mono_ns=mono_ns,
        pid=pid or None,
        ppid=ppid if pid else None,
        exe=_exe(parts[15]) if pid else None,
        cmdline=decode_argv(parts[16]) if pid else None,
    )


# The longest EXE and ARGV sbx-capture prints (8 names of 32 bytes, 128 bytes of argv, every
# byte escaped as 4 characters): anything longer is not its output.
_MAX_EXE_TEXT = 3 + 8 * (1 + 32 * 4)
_MAX_ARGV_TEXT = 128 * 4
_U32 = 1 << 32


def parse_fwchange_line(line: str, mono_offset: float) -> FirewallChange | None:
    """One firewall change of the events file (images/capture/sbx-capture.c: `w SEQ MONO_NS PID
    TID PPID UID WHAT NETNS EXE ARGV`); None if it is not one."""
    parts = line.split(" ")
    if len(parts) != 11 or parts[0] != "w" or parts[7] not in FIREWALL_CHANGES:
        return None
    numbers = [_int(p) for p in (*parts[1:7], parts[8])]
    if any(n is None or n < 0 for n in numbers):
        return None
    seq, mono_ns, pid, tid, ppid, uid, netns = (n or 0 for n in numbers)
    exe, argv = parts[9], parts[10]
    if (
        max(pid, tid, ppid, uid, netns) >= _U32
        or not (exe == "-" or exe.startswith(("/", "...")))
        or len(exe) > _MAX_EXE_TEXT
        or len(argv) > _MAX_ARGV_TEXT
    ):
        return None
    return FirewallChange(
        seq=seq,
        mono_ns=mono_ns,
        time=mono_offset + mono_ns / 1e9,
        what=parts[7],
        netns=netns,
        pid=pid,
        tid=tid,
        ppid=ppid,
        uid=uid,
        exe=_exe(exe),
        cmdline=decode_argv(argv),
    )


# ---- the collection's output -----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What one run of collect_script returned, parsed."""

    boot_id: str
    wall: float  # the guest's wall clock (epoch seconds) when it ran
    uptime: float
    # Whether the capture was attached when the collection drained it; its counts, since it was
    # loaded, of connect events and of firewall records seen, and of those dropped (ring buffer
    # full) (None: not said).
    capture_loaded: bool
    capture_seq: int | None
    capture_dropped: int | None
    packets_seq: int | None
    packets_dropped: int | None
    # The events file's inode and size when read (None: not reported).
    events_inode: int | None
    events_size: int | None  # where what was read ends: the next collection reads from there
    events: tuple[ConnectEvent, ...]
    firewall: tuple[FirewallRecord, ...]
    capture_error: str = ""  # what the drain said when it failed
    events_left: int = 0  # bytes of the events file past what this collection read
    fwchanges: tuple[FirewallChange, ...] = ()
    # The capture's count of firewall changes and of those dropped (None: not said).
    fwchanges_seq: int | None = None
    fwchanges_dropped: int | None = None
    unreadable: int = 0  # lines of the events file that are no record sbx-capture writes
    # Links of the capture found unpinned (their programs detached): the collection loaded it
    # again, and its counts start at 0.
    capture_partial: tuple[str, ...] = ()


def _events_left(events_pos: list[str]) -> int:
    """`@@eventspos INODE END SIZE`: how much of the file this collection left for the next."""
    if len(events_pos) != 3:
        return 0
    end, size = _int(events_pos[1]), _int(events_pos[2])
    return max(0, size - end) if end is not None and size is not None else 0


def parse_snapshot(text: str) -> Snapshot:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    clock: list[str] = []
    capture_clock: list[str] = []
    capture: list[str] = []
    capture_error: list[str] = []
    partial: list[str] = []
    boot_id = ""
    events_pos: list[str] = []
    lines = text.splitlines()
    # The events section is the guest's file, which guest root can write markers into: it is
    # everything between the first @@events and the last @@clock line, and no marker inside it
    # counts (a forged @@eventspos would steer the cursor).
    first = lines.index(_EVENTS) if _EVENTS in lines else len(lines)
    last = max((i for i, x in enumerate(lines) if x.startswith(_CLOCK + " ")), default=len(lines))
    body = lines[first + 1 : last] if last > first else []
    if last > first:
        sections[_EVENTS] = body
        lines = lines[:first] + lines[last:]
    for line in lines:
        head = line.split(" ", 1)[0]
        if head == _EVENTS_POS:
            events_pos = line.split()[1:]
        elif head == _CLOCK:
            clock = line.split()[1:]
        elif head == _CAPTURE_CLOCK:
            capture_clock = line.split()[1:]
        elif head == _CAPTURE_PARTIAL:
            name = line.split()[1:2] or [""]
            partial += [name[0]] if _PIN_NAME.fullmatch(name[0]) and len(partial) < 16 else []
        elif head == _CAPTURE:
            capture = line.split()[1:]
        elif head == _BOOT:
            boot_id = (line.split()[1:] or [""])[0][:64]
        elif line in (_EVENTS, _END):
            current = sections.setdefault(line, [])
        elif current is not None:
            current.append(line)
        elif line.startswith("sbx-capture:"):
            capture_error.append(line)
    if _END not in sections or len(clock) != 2:
        raise GuestError(
            "the connection capture's output from the guest is incomplete",
            "the guest may be out of memory or disk; check `sandbox exec -- df -h /var/lib`",
        )
    wall, uptime = guest_seconds(clock[0], "collecting"), guest_seconds(clock[1], "collecting")
    # CLOCK_MONOTONIC and the wall clock, read together by the drain; /proc/uptime otherwise.
    mono_offset = (
        guest_seconds(capture_clock[1], "collecting")
        - guest_seconds(capture_clock[0], "collecting")
        if len(capture_clock) == 2
        else wall - uptime
    )
    lines = sections.get(_EVENTS, [])
    events = [parse_event_line(line, mono_offset) for line in lines if line.startswith("c ")]
    records = [parse_packet_line(line, mono_offset) for line in lines if line.startswith("f ")]
    changes = [parse_fwchange_line(line, mono_offset) for line in lines if line.startswith("w ")]
    parsed = sum(x is not None for x in (*events, *records, *changes))
    loaded = len(capture) >= 1 and capture[0] == "ok"
    counts = [_int(c) for c in capture[2:6]] if loaded and len(capture) >= 6 else [None] * 4
    # An earlier capture printed no count of firewall changes.
    fw_counts = [_int(c) for c in capture[6:8]] if loaded and len(capture) >= 8 else [None] * 2
    return Snapshot(
        boot_id=boot_id,
        wall=wall,
        uptime=uptime,
        capture_loaded=loaded,
        capture_seq=counts[0],
        capture_dropped=counts[1],
        packets_seq=counts[2],
        packets_dropped=counts[3],
        events_inode=_int(events_pos[0]) if len(events_pos) in (2, 3) else None,
        events_size=_int(events_pos[1]) if len(events_pos) in (2, 3) else None,
        events_left=_events_left(events_pos),
        events=tuple(e for e in events if e is not None),
        firewall=tuple(r for r in records if r is not None),
        capture_error="\n".join(capture_error),
        fwchanges=tuple(c for c in changes if c is not None),
        fwchanges_seq=fw_counts[0],
        fwchanges_dropped=fw_counts[1],
        # The read ends with an empty line (the script's own echo).
        unreadable=sum(1 for line in lines if line) - parsed,
        capture_partial=tuple(partial),
    )


# ---- cursor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """How far the guest's logs have been collected; kept on the host between collections
    (paths.CAPTURE_CURSOR).

    boot_id: the guest boot the positions belong to (a reboot starts them again).
    events_inode, events_offset: this boot's events file and the byte the next collection reads
    it from (0, 0: all of it). capture_seq, capture_dropped, packets_seq, packets_dropped: the
    capture's counts at the last collection (they start again when it is loaded again).
    pending / pending_events: items read but not emitted yet, waiting for their other half.
    flows: recently logged flows → [time, IPv4 ID or None] of their last record (a resent
    packet is logged again). losses: every loss ever detected, for `sandbox logs` to show next
    to the records. fwchanges_seq, fwchanges_dropped: the capture's counts of firewall changes.
    policy_boot_id, policy_mono_ns: `up`'s Mark (the firewall changes of that boot up to it are
    its own push of the policy); a reboot forgets it, and every change after one is the guest's.
    """

    boot_id: str = ""
    events_inode: int = 0
    events_offset: int = 0
    capture_seq: int = 0
    capture_dropped: int = 0
    packets_seq: int = 0
    packets_dropped: int = 0
    pending: tuple[dict[str, Any], ...] = ()
    pending_events: tuple[dict[str, Any], ...] = ()
    pending_probes: tuple[str, ...] = ()  # the keys of pending events that are probes
    flows: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    losses: tuple[str, ...] = ()
    fwchanges_seq: int = 0
    fwchanges_dropped: int = 0
    policy_boot_id: str = ""
    policy_mono_ns: int = 0

    def marked(self, mark: Mark) -> Self:
        """This cursor with `up`'s Mark."""
        return replace(self, policy_boot_id=mark.boot_id, policy_mono_ns=mark.mono_ns)

    def to_json(self) -> str:
        value = asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in value.items()})

    @classmethod
    def load(cls, path: Path) -> Self:
        """The cursor kept in `path`; a fresh one where there is none yet."""
        return cls.from_json(path.read_text()) if path.exists() else cls()

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            value = json.loads(text)
            return cls(
                boot_id=str(value.get("boot_id", "")),
                events_inode=int(value.get("events_inode", 0)),
                events_offset=int(value.get("events_offset", 0)),
                capture_seq=int(value.get("capture_seq", 0)),
                capture_dropped=int(value.get("capture_dropped", 0)),
                packets_seq=int(value.get("packets_seq", 0)),
                packets_dropped=int(value.get("packets_dropped", 0)),
                pending=tuple(dict(p) for p in value.get("pending", [])),
                pending_events=tuple(dict(p) for p in value.get("pending_events", [])),
                pending_probes=tuple(str(k) for k in value.get("pending_probes", [])),
                flows={
                    str(k): (float(t), None if i is None else int(i))
                    for k, (t, i) in value.get("flows", {}).items()
                },
                losses=tuple(str(s) for s in value.get("losses", [])),
                fwchanges_seq=int(value.get("fwchanges_seq", 0)),
                fwchanges_dropped=int(value.get("fwchanges_dropped", 0)),
                policy_boot_id=str(value.get("policy_boot_id", "")),
                policy_mono_ns=int(value.get("policy_mono_ns", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise GuestError(
                f"the capture cursor is damaged: {error!r}",
                "remove the sandbox's logs/capture-cursor.json; the next collection then takes "
                "the guest's logs from the start again",
            ) from None


def _to_json(item: FirewallRecord | ConnectEvent) -> dict[str, Any]:
    value = asdict(item)
    if isinstance(item, FirewallRecord):
        value["verdict"] = item.verdict.value
    return value


def _record_from_json(value: dict[str, Any]) -> FirewallRecord:
    return FirewallRecord(**{**value, "verdict": Verdict(value["verdict"])})


def _event_from_json(value: dict[str, Any]) -> ConnectEvent:
    return ConnectEvent(**value)


# ---- the join (pure) -------------------------------------------------------------------------


def _record_order(record: FirewallRecord) -> tuple[int, int]:
    """The order the firewall logged them in (seq alone starts again with a capture loaded
    again)."""
    return record.mono_ns, record.seq


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _local(address: str) -> bool:
    """Loopback, or the unspecified address (a connect to 0.0.0.0 or :: reaches this host:
    sshd checks its listening address so)."""
    parsed = ipaddress.ip_address(address)
    return parsed.is_loopback or parsed.is_unspecified


def _attempt(
    record: FirewallRecord | None,
    event: ConnectEvent | None,
    boot_id: str,
    *,
    verdict: Verdict | None = None,
) -> Attempt:
    # Ids carry the boot: the capture's counts and clocks start again when the guest reboots.
    boot = boot_id.replace("-", "")[:8]
    if record is not None:
        return Attempt(
            id=f"k{record.key}.{boot}",
            # The connect's own time: inside the call that made it (orchestrator/run/xdebug.py
            # attributes by it).
            time=iso_time(event.time if event is not None else record.time),
            verdict=record.verdict,
            proto=record.proto,
            family=record.family,
            dst=record.dst,
            dport=record.dport,
            src=record.src,
            sport=record.sport,
            uid=event.uid if event is not None else record.uid,
            pid=event.pid if event else record.pid,
            ppid=event.ppid if event else record.ppid,
            exe=event.exe if event else record.exe,
            cmdline=event.cmdline if event else record.cmdline,
            evidence="connect+firewall" if event else "firewall",
        )
    assert event is not None
    if verdict is None:
        verdict = Verdict.LOOPBACK if _loopback(event.dst) else Verdict.BLOCKED
    return Attempt(
        id=f"c{event.key}.{boot}",
        time=iso_time(event.time),
        verdict=verdict,
        proto=event.proto,
        family=event.family,
        dst=event.dst,
        dport=event.dport,
        uid=event.uid,
        pid=event.pid,
        ppid=event.ppid,
        exe=event.exe,
        cmdline=event.cmdline,
        evidence="connect",
    )


def _matches(record: FirewallRecord, event: ConnectEvent) -> bool:
    return (
        record.dst == event.dst
        and record.dport == event.dport
        and event.proto in ("", record.proto)
        and (record.uid is None or event.uid is None or record.uid == event.uid)
        and abs(record.time - event.time) <= JOIN_WINDOW
    )


def join(
    records: Sequence[FirewallRecord], events: Sequence[ConnectEvent]
) -> list[tuple[FirewallRecord | None, ConnectEvent | None]]:
    """Pair firewall records with connect events, each used at most once.

    Within one (destination, port), in two steps:
    - Records that open a flow take events in order, the n-th record the n-th event within
      JOIN_WINDOW: in a burst of connects to one address that keeps the order (a "closest in time"
      pick can swap pids when the two clocks are a few ms apart).
    - A `retry` record (a flow seen before: a resend, or a new connect that got the same source
      port; or a packet of an established flow) is an attempt only if an event is left for it.
      Skipping one that was in fact a new connect shifts every later pair of the burst by one
      place, and the event left over is the last one, seconds away from it. So each event left
      over goes to the nearest retry record for which the pairs in between can each move one place
      and stay within JOIN_WINDOW (an augmenting path in matching terms): the number of pairs is
      the largest possible, and retry records only pair where an event would otherwise be lost.

    Unpaired items come back alone.
    """
    by_key: dict[tuple[str, int | None], list[ConnectEvent]] = {}
    for event in sorted(events, key=lambda e: (e.time, e.seq, e.key)):
        by_key.setdefault((event.dst, event.dport), []).append(event)
    records_by_key: dict[tuple[str, int | None], list[FirewallRecord]] = {}
    for record in sorted(records, key=_record_order):
        records_by_key.setdefault((record.dst, record.dport), []).append(record)
    paired: dict[str, ConnectEvent] = {}  # record key → its event
    for key, key_records in records_by_key.items():
        key_events = by_key.get(key, [])
        for record_index, event_index in _join_key(key_records, key_events):
            paired[key_records[record_index].key] = key_events[event_index]
    used = {event.key for event in paired.values()}
    pairs: list[tuple[FirewallRecord | None, ConnectEvent | None]] = [
        (record, paired.get(record.key)) for record in sorted(records, key=_record_order)
    ]
    pairs += [(None, e) for e in events if e.key not in used]
    return pairs


# How many retry records an event left over tries, nearest first, before it stays alone.
_AUGMENT_TRIES = 32


def _join_key(
    records: Sequence[FirewallRecord], events: Sequence[ConnectEvent]
) -> list[tuple[int, int]]:
    """join() for one (destination, port): records in sequence order, events in time order;
    (record index, event index) pairs in record order."""
    taken = [False] * len(events)
    rec_of: list[int] = []  # matched record indices, increasing
    ev_of: list[int] = []  # their events, same positions
    start = 0
    for index, record in enumerate(records):
        if record.retry:
            continue
        # Events too old for this record are too old for every later one too (records come in
        # time order): skipped for good.
        while start < len(events) and (
            taken[start] or events[start].time < record.time - JOIN_WINDOW
        ):
            start += 1
        for j in range(start, len(events)):
            event = events[j]
            if taken[j]:
                continue
            if event.time > record.time + JOIN_WINDOW:
                break
            if _matches(record, event):
                taken[j] = True
                rec_of.append(index)
                ev_of.append(j)
                break

    free = [i for i, r in enumerate(records) if r.retry]  # retry records not paired yet
    free_times = [records[i].time for i in free]
    for j, was_taken in enumerate(taken):
        if not free:
            break
        if was_taken or _loopback(events[j].dst):
            continue
        # The free records nearest to event j in time, both sides, the shortest path first.
        q = bisect.bisect_left(ev_of, j)
        pivot = bisect.bisect_left(free_times, events[j].time)
        around = free[max(pivot - _AUGMENT_TRIES, 0) : pivot + _AUGMENT_TRIES]
        nearest = sorted(
            around,
            key=lambda i: (
                abs(bisect.bisect_left(rec_of, i) - q),
                abs(records[i].time - events[j].time),
            ),
        )
        for i in nearest[:_AUGMENT_TRIES]:
            if _augment(records, events, rec_of, ev_of, i, j):
                k = free.index(i)
                del free[k], free_times[k]
                break
    return list(zip(rec_of, ev_of, strict=True))


def _augment(
    records: Sequence[FirewallRecord],
    events: Sequence[ConnectEvent],
    rec_of: list[int],
    ev_of: list[int],
    i: int,
    j: int,
) -> bool:
    """Pair unpaired record i and unpaired event j by moving each pair between them one place
    (rec_of and ev_of are changed in place); False, and nothing changed, if a moved pair would
    not match."""
    p = bisect.bisect_left(rec_of, i)
    q = bisect.bisect_left(ev_of, j)
    # With i inserted at p and j at q, each position between them pairs a record with the event
    # of its neighbour.
    for k in range(min(p, q), max(p, q) + 1):
        record = i if k == p else rec_of[k] if k < p else rec_of[k - 1]
        event = j if k == q else ev_of[k] if k < q else ev_of[k - 1]
        if not _matches(records[record], events[event]):
            return False
    rec_of.insert(p, i)
    ev_of.insert(q, j)
    return True


@dataclass(frozen=True)
class Collected:
    attempts: list[Attempt]
    cursor: Cursor
    warnings: list[str]  # losses detected by this collection (also appended to cursor.losses)


def tamper_record(
    when: float,
    what: str,
    key: str,
    *,
    pid: int | None = None,
    ppid: int | None = None,
    uid: int | None = None,
    exe: str | None = None,
    cmdline: str | None = None,
) -> Attempt:
    """A row of the connection log that is no attempt: the guest changed what records them
    (and, when the capture saw it, the process that did)."""
    return Attempt(
        id=f"t{key}",
        time=iso_time(when),
        verdict=Verdict.TAMPER,
        proto="",
        family=4,
        dst="",
        dport=None,
        uid=uid,
        pid=pid,
        ppid=ppid,
        exe=exe,
        cmdline=cmdline,
        evidence=what,
    )


def _fwchange_tamper(snapshot: Snapshot, cursor: Cursor) -> list[Attempt]:
    """A tamper row for each change to the guest's firewall but `up`'s own push of the policy."""
    boot = snapshot.boot_id.replace("-", "")[:8]
    ours = snapshot.boot_id == cursor.policy_boot_id
    return [
        tamper_record(
            change.time,
            change.describe(),
            f"w{change.key}.{boot}",
            pid=change.pid,
            ppid=change.ppid,
            uid=change.uid,
            exe=change.exe,
            cmdline=change.cmdline,
        )
        for change in snapshot.fwchanges
        if not (ours and change.mono_ns <= cursor.policy_mono_ns)
    ]


def _capture_tamper(snapshot: Snapshot, cursor: Cursor, rebooted: bool) -> list[Attempt]:
    """The capture found detached, or loaded again, since the last collection: a tamper row (the
    guest's own kernel does not say which process did it; the host's flow record shows what it
    then sent)."""
    if rebooted:
        return []
    key = f"{round(snapshot.wall * 1000)}.{snapshot.boot_id.replace('-', '')[:8]}"
    if not snapshot.capture_loaded:
        what = "the connection capture was detached in the guest (attached again now)"
    elif snapshot.capture_partial:
        what = (
            "part of the connection capture was detached in the guest ("
            + ", ".join(snapshot.capture_partial)
            + "; attached again now)"
        )
    elif _reloaded(snapshot, cursor):
        what = "the connection capture was loaded again in the guest"
    else:
        return []
    return [tamper_record(snapshot.wall, what, f"cap{key}")]


def _reloaded(snapshot: Snapshot, cursor: Cursor) -> bool:
    """Whether a count of the capture went back: it was loaded again (they start at 0)."""
    return any(
        now is not None and now < before
        for now, before in (
            (snapshot.capture_seq, cursor.capture_seq),
            (snapshot.packets_seq, cursor.packets_seq),
            (snapshot.fwchanges_seq, cursor.fwchanges_seq),
        )
    )


def _loss_warnings(snapshot: Snapshot, cursor: Cursor, rebooted: bool) -> list[str]:
    stamp = iso_time(snapshot.wall)
    warnings = []
    if rebooted:
        warnings.append(
            f"{stamp}: the guest rebooted since the last collection: records of the previous "
            "boot that were not collected are lost"
        )
    if not snapshot.capture_loaded:
        detail = f" ({snapshot.capture_error})" if snapshot.capture_error else ""
        warnings.append(
            f"{stamp}: the capture was not attached in the guest{detail} (guest root removed "
            "it, or the boot did not load it): attempts since the last collection are not "
            "recorded (the host's DNS log and --pcap still are); the collection attached it again"
        )
        return warnings
    if snapshot.capture_partial:
        warnings.append(
            f"{stamp}: part of the capture was detached in the guest ("
            + ", ".join(snapshot.capture_partial)
            + "): what it records since the last collection may be missing; the collection "
            "attached it again"
        )
        return warnings
    if _reloaded(snapshot, cursor):
        warnings.append(
            f"{stamp}: the capture was loaded again in the guest since the last collection (by "
            "guest root): records before that are lost"
        )
        return warnings
    for what, now, before in (
        ("connect events", snapshot.capture_dropped, cursor.capture_dropped),
        ("firewall records", snapshot.packets_dropped, cursor.packets_dropped),
        ("firewall changes", snapshot.fwchanges_dropped, cursor.fwchanges_dropped),
    ):
        if now is not None and now > before:
            warnings.append(
                f"{stamp}: the capture's buffer was full: {now - before} {what} were dropped "
                "(collections come every `collect_every` seconds during `run` and `exec`, not "
                "during `sandbox ssh`)"
            )
    return warnings


def process(snapshot: Snapshot, cursor: Cursor, *, final: bool = False) -> Collected:
    """Turn one collection's raw material into attempts, exactly once given the cursor.

    Items that may still get their other half (a firewall record and its connect event drained
    apart, a UDP connect whose first datagram has not left yet) wait in the cursor for the next
    collection while younger than SETTLE_SECONDS; `final` (at destroy) holds nothing back.
    """
    rebooted = bool(cursor.boot_id) and snapshot.boot_id != cursor.boot_id
    if rebooted:
        # Sequence numbers, the capture and its events file start again at every boot.
        cursor = Cursor(losses=cursor.losses)
    warnings = _loss_warnings(snapshot, cursor, rebooted)
    if snapshot.unreadable:
        warnings.append(
            f"{iso_time(snapshot.wall)}: {snapshot.unreadable} line(s) of the guest's events file "
            "are no record of the capture and were dropped (guest root may have written them)"
        )
    events = [_event_from_json(p) for p in cursor.pending_events]
    events += snapshot.events

    flows = {k: v for k, v in cursor.flows.items() if v[0] > snapshot.wall - FLOW_MEMORY_SECONDS}
    records = [_record_from_json(p) for p in cursor.pending]
    for record in sorted(snapshot.firewall, key=_record_order):
        # TCP resends its SYN and a blocked UDP flow resends datagrams: conntrack calls every
        # copy NEW and the firewall logs it again. But a new connect may also reuse the port of
        # an earlier one to the same place (thousands of connects in a burst do). So a record of
        # a flow seen before is only a possible retry: it is an attempt if a connect of its own
        # is left over once the other records have theirs.
        if record.sport is not None:
            previous = flows.get(record.flow())
            flows[record.flow()] = (record.time, record.ident)
            if record.established:
                # The flow's own next datagram is no attempt; another socket's may be.
                if previous is not None and _same_socket(record, previous[1]):
                    continue
                record = replace(record, retry=True)
            elif previous is not None and _maybe_resent(record, *previous):
                record = replace(record, retry=True)
        elif record.established:
            continue
        records.append(record)

    pairs = join(records, events)
    # A probe held back for its datagram keeps what its burst said (the other half of the
    # burst, refused by the kernel, may have gone out already).
    probes = _probes([e for half, e in pairs if half is None and e is not None])
    probes |= set(cursor.pending_probes)

    attempts: list[Attempt] = []
    pending: list[FirewallRecord] = []
    pending_events: list[ConnectEvent] = []
    young = snapshot.wall - SETTLE_SECONDS
    for half, event in pairs:
        if half is not None and event is None and not final and half.time > young:
            pending.append(half)  # its connect event may be drained next time
        elif half is not None and event is None and half.retry:
            continue
        elif half is None and event is not None and not _event_only(event):
            if not final and event.time > young:
                pending_events.append(event)  # a UDP connect whose first datagram may follow
            elif _unlogged(event):
                # A TCP connect sends its SYN, which an intact guest firewall always logs. None
                # came: the rules were changed or bypassed. Still an attempt (the host-side
                # filter decided it; lifecycle sets which way from the policy).
                attempts.append(_attempt(None, event, snapshot.boot_id, verdict=Verdict.UNLOGGED))
            elif _datagram(event) and not _local(event.dst):
                # A datagram socket connected outside that sent nothing: intent all the same,
                # unless it is glibc sorting its lookup's answers.
                verdict = Verdict.PROBE if event.key in probes else Verdict.UNSENT
                attempts.append(_attempt(None, event, snapshot.boot_id, verdict=verdict))
        elif half is None and event is not None and event.key in probes:
            # A probe the kernel refused (no route to the address family): the lookup's too.
            attempts.append(_attempt(None, event, snapshot.boot_id, verdict=Verdict.PROBE))
        else:
            attempts.append(_attempt(half, event, snapshot.boot_id))
    attempts += _capture_tamper(snapshot, cursor, rebooted)
    attempts += _fwchange_tamper(snapshot, cursor)
    attempts.sort(key=lambda a: (a.time, a.id))

    # A capture attached again counts from 0 again (this collection loaded it again if it was
    # found in part).
    counts = (
        snapshot.capture_seq,
        snapshot.capture_dropped,
        snapshot.packets_seq,
        snapshot.packets_dropped,
        snapshot.fwchanges_seq,
        snapshot.fwchanges_dropped,
    )
    seq, dropped, pseq, pdropped, fseq, fdropped = (
        0 if snapshot.capture_partial else n or 0 for n in counts
    )
    new_cursor = Cursor(
        boot_id=snapshot.boot_id,
        capture_seq=seq,
        capture_dropped=dropped,
        packets_seq=pseq,
        packets_dropped=pdropped,
        fwchanges_seq=fseq,
        fwchanges_dropped=fdropped,
        policy_boot_id=cursor.policy_boot_id,
        policy_mono_ns=cursor.policy_mono_ns,
        **_next_events_position(snapshot, cursor),
        pending=tuple(_to_json(r) for r in pending),
        pending_events=tuple(_to_json(e) for e in pending_events),
        pending_probes=tuple(e.key for e in pending_events if e.key in probes),
        flows=flows,
        losses=cursor.losses + tuple(warnings),
    )
    if snapshot.events_left > 0:
        warnings.append(
            f"the guest's events file holds {snapshot.events_left} bytes more than one collection"
            " reads; the next collection goes on from there"
        )
    for warning in warnings:
        log.warning("connection capture: %s", warning)
    return Collected(attempts, new_cursor, warnings)


def _next_events_position(snapshot: Snapshot, cursor: Cursor) -> dict[str, int]:
    """Where the next collection reads the events file from: its end as read now (the drain
    writes whole lines, and none while this one read it)."""
    if snapshot.events_inode is None or snapshot.events_size is None:
        return {"events_inode": cursor.events_inode, "events_offset": cursor.events_offset}
    return {"events_inode": snapshot.events_inode, "events_offset": snapshot.events_size}


def _maybe_resent(record: FirewallRecord, last_time: float, last_ident: int | None) -> bool:
    """Whether a record of a flow already logged may be a resend rather than a new connect that
    reuses the port. IPv4 tells: a connected socket numbers its packets from a random start
    (Linux sets inet_id at connect), so a resend's ID follows the last one's and a new socket's
    does not (except by chance: join() copes with that). Otherwise only time tells: TCP's first
    resend comes after a 1 s timeout."""
    if record.ident is not None and last_ident is not None:
        return _same_socket(record, last_ident)
    return record.time - last_time >= _RESEND_MIN_SECONDS


def _same_socket(record: FirewallRecord, last_ident: int | None) -> bool:
    """Whether an IPv4 record's ID follows the flow's last one (ID 0 twice: an unconnected
    socket, whose datagrams with DF set all carry 0)."""
    if record.ident is None or last_ident is None:
        return False
    step = (record.ident - last_ident) % 65536
    return 0 < step <= _RESEND_ID_STEP or record.ident == last_ident == 0


def _unlogged(event: ConnectEvent) -> bool:
    """A connect with no firewall record that is an attempt all the same: TCP to elsewhere than
    loopback (a UDP connect with no record sent nothing: glibc's address sorting does that)."""
    return event.proto == "tcp" and not _loopback(event.dst)


def _datagram(event: ConnectEvent) -> bool:
    return event.proto in ("udp", "udplite")


def _probes(alone: Sequence[ConnectEvent]) -> set[str]:
    """The keys of the connects (of those with no packet) that are glibc's getaddrinfo sorting
    a lookup's answers: it connects a UDP socket to each of two or more addresses in turn (one
    family's reused: connect, AF_UNSPEC connect, connect again), with the same port, from the
    thread that looked the name up, and sends nothing (the kernel may refuse one: no route to
    that family). A UDP connect that sent nothing is a probe when the same thread connected
    another address with the same port so, within PROBE_BURST_SECONDS; a lone one is the
    software's own intent. Two unused sockets of the software's own, to two addresses on one
    port back to back, would count as probes: shown with them (--probes), not lost."""
    groups: dict[tuple[int, int], list[ConnectEvent]] = {}
    for event in alone:
        if _datagram(event) and not _local(event.dst):
            groups.setdefault((event.tid, event.dport), []).append(event)
    found: set[str] = set()
    for group in groups.values():
        group.sort(key=lambda e: (e.time, e.seq))
        for before, after in itertools.pairwise(group):
            if after.dst != before.dst and after.time - before.time <= PROBE_BURST_SECONDS:
                found.update((before.key, after.key))
    return found


def _event_only(event: ConnectEvent) -> bool:
    """Whether a connect event with no firewall record is an attempt of its own: a TCP connect
    to loopback (never logged by the firewall), or one the kernel refused before any packet (no
    route). A non-blocking or successful UDP connect with no packet is a socket that never sent:
    glibc's getaddrinfo connects one to each address it sorts, loopback ones included."""
    if _loopback(event.dst):
        return event.proto != "udp"
    return event.exit not in _NOT_REFUSED


# ---- DNS names -------------------------------------------------------------------------------

# A resolver's log line and the guest's record of the same query: the log has whole seconds
# (the query's second, rounded down) on the host's clock, the guest's record its own clock (set
# from the host's at boot: they differ by less than CLOCK_SKEW). A lookup's queries (A, AAAA, a
# resend after the resolver's 5 s timeout) leave the socket within QUERY_WINDOW of its connect.
CLOCK_SKEW = 2.0
QUERY_WINDOW = 12.0


def name_queries(attempts: Iterable[Attempt], queries: Iterable[DnsQuery]) -> list[Attempt]:
    """Each query to the resolver (verdict dns) with the name and types it asked: the resolver's
    log names each query's client address and source port, the guest's record the socket's
    (`src`, `sport`), whichever thread or library sent it. One socket may ask several (glibc
    asks A and AAAA on one); rows already named keep their name."""
    by_socket: dict[tuple[str, int], list[tuple[float, DnsQuery]]] = {}
    for query in queries:
        if query.port is not None:
            when = parse_time(query.time).timestamp()
            by_socket.setdefault((_canonical(query.client), query.port), []).append((when, query))
    result = []
    for attempt in attempts:
        if (
            attempt.verdict is Verdict.DNS
            and attempt.dns_name is None
            and attempt.src is not None
            and attempt.sport is not None
        ):
            when = parse_time(attempt.time).timestamp()
            asked = [
                query
                for logged, query in by_socket.get((_canonical(attempt.src), attempt.sport), [])
                if -1.0 - CLOCK_SKEW <= logged - when <= QUERY_WINDOW + CLOCK_SKEW
            ]
            if asked:
                attempt = replace(
                    attempt,
                    dns_name=", ".join(dict.fromkeys(q.name for q in asked)),
                    dns_type=", ".join(dict.fromkeys(q.qtype for q in asked)),
                )
        result.append(attempt)
    return result


def _answers(queries: Iterable[DnsQuery]) -> dict[str, list[tuple[float, str]]]:
    """Per address an answer gave: (when it was logged, the name asked), oldest first."""
    answers: dict[str, list[tuple[float, str]]] = {}
    for query in queries:
        when = parse_time(query.time).timestamp()
        for address in query.addresses():
            answers.setdefault(address, []).append((when, query.name))
    for entries in answers.values():
        entries.sort()
    return answers


def attach_dns_names(attempts: Iterable[Attempt], queries: Iterable[DnsQuery]) -> list[Attempt]:
    """Each attempt with dns_name set from the latest query before it whose answer held its
    destination (attempts that already have a name keep it). "Before" on two clocks: the log's
    whole second on the host's may read up to CLOCK_SKEW after the guest's connect that
    followed the answer (measured: a query logged at :20 for a connect at :19.664), so with no
    answer before it, the first within CLOCK_SKEW after it names it."""
    answers = _answers(queries)
    result = []
    for attempt in attempts:
        entries = answers.get(_canonical(attempt.dst), [])
        if attempt.dns_name is None and entries:
            when = parse_time(attempt.time).timestamp()
            index = bisect.bisect_right(entries, (when, "\uffff"))
            if index:
                attempt = replace(attempt, dns_name=entries[index - 1][1])
            elif entries[0][0] <= when + CLOCK_SKEW:
                attempt = replace(attempt, dns_name=entries[0][1])
        result.append(attempt)
    return result


def confirm_probes(attempts: Iterable[Attempt], queries: Sequence[DnsQuery]) -> list[Attempt]:
    """A probe (see _probes) stays one only if a query answered shortly before it gave its
    destination: glibc probes the addresses a lookup returned, while the software's own unused
    sockets (to addresses it was given, not looked up) are its intent (Verdict.UNSENT). Names
    from /etc/hosts are looked up without the resolver: their probes show as unsent. Without
    the resolver's log (a remote hypervisor: no query at all) the capture alone decides."""
    if not queries:
        return list(attempts)
    answers = _answers(queries)
    result = []
    for attempt in attempts:
        if attempt.verdict is Verdict.PROBE:
            when = parse_time(attempt.time).timestamp()
            earliest = when - QUERY_WINDOW - 1.0 - CLOCK_SKEW
            if not any(
                earliest <= logged <= when + CLOCK_SKEW
                for logged, _name in answers.get(_canonical(attempt.dst), [])
            ):
                attempt = replace(attempt, verdict=Verdict.UNSENT)
        result.append(attempt)
    return result


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


# ---- the host's copy (sandbox-capture-stream) ----------------------------------------------

# The guest's sandbox-capture-stream.service drains the ring buffer every 100 ms as a collection
# does (into the same events file) and copies what the file gained to a virtio-serial port whose
# host side is a file (domain.CAPTURE_CHANNEL, kept by virtlogd: 2 MiB a file, older ones
# rotated to NAME.0, NAME.1, ...). `destroy` takes the last records from there instead of over
# SSH. What it reads is the guest's word like any collection's, and parsed by the same code:
# the copy is turned back into collect_script's output, from the cursor on.
_STREAM_FILE, _STREAM_DATA, _STREAM_ROUND = "@@file", "@@data", "@@round"
# The most one `@@data` holds (sbx-capture.c STREAM_CHUNK), and the most of the host's files a
# reading takes (the newest bytes; virtlogd keeps 8 MiB by default).
_STREAM_CHUNK = 256 << 10
STREAM_READ_BYTES = 32 << 20
# virtlogd keeps max_backups (3 by default) rotated files; more than this is not virtlogd's.
_STREAM_MAX_ROTATED = 16
# A report line the copy may give a snapshot (the rest of a round's lines are its data).
_STREAM_REPORT = (_CAPTURE, _CAPTURE_PARTIAL, _CAPTURE_CLOCK)
_HEADER = re.compile(rb"@@(file|data|round|capture|capturepartial|captureclock)( [ -~]{0,200})?")


@dataclass(frozen=True)
class Stream:
    """The host's copy, parsed: bytes `start` to `start + len(data)` of the guest's events file
    `inode` (one run without a gap), and the last complete round's report (None: no round is
    complete) and how much of the file it had not copied yet (a round copies 256 KiB at most)."""

    boot_id: str
    inode: int | None
    start: int
    data: bytes
    report: tuple[str, ...]
    round: int | None
    left: int = 0


def parse_stream(raw: bytes) -> Stream:
    """The copy's rounds (images/capture/sbx-capture.c stream_round), from wherever `raw` starts
    (virtlogd may have rotated its beginning away: lines before the first header are skipped)."""
    boot_id, inode, start, run = "", None, 0, bytearray()
    pending: list[str] = []
    drain: list[str] = []
    clock: list[str] = []
    report: tuple[str, ...] = ()
    last_round: int | None = None
    left = 0
    i = 0
    while i < len(raw):
        end = raw.find(b"\n", i)
        end = len(raw) if end < 0 else end
        line = raw[i:end]
        i = end + 1
        header = _HEADER.fullmatch(line)
        if header is None:
            continue  # the tail of a chunk cut by a rotation, or the guest's noise
        words = line.decode("ascii").split(" ")
        if words[0] == _STREAM_DATA:
            offset, size = (_int(w) for w in words[1:]) if len(words) == 3 else (None, None)
            if offset is None or size is None or not 0 <= size <= _STREAM_CHUNK or offset < 0:
                continue
            payload = raw[i : i + size]
            if len(payload) < size or raw[i + size : i + size + 1] != b"\n":
                break  # cut short: the VM stopped while it was being written
            i += size + 1
            if offset != start + len(run):
                start, run = offset, bytearray()  # a gap: only what follows it is whole
            run += payload
        elif words[0] == _STREAM_FILE:
            # `@@file INODE SENT`: the file copied is INODE, up to SENT. A run that says
            # otherwise ends: a new one starts there. (A run whose beginning was rotated away
            # learns its file here.)
            said, sent = (_int(w) for w in words[1:]) if len(words) == 3 else (None, None)
            if said is None or sent is None or sent < 0:
                continue
            if sent != start + len(run) or inode not in (None, said):
                start, run = sent, bytearray()
            inode = said
        elif words[0] == _STREAM_ROUND:
            number = _int(words[1]) if len(words) in (3, 4) else None
            behind = _int(words[3]) if len(words) == 4 else 0
            if number is not None and behind is not None:
                boot_id, last_round, left = words[2][:64], number, max(0, behind)
                # A round that did not drain says the clock only: the last drain's counts hold.
                drained = [x for x in pending if not x.startswith(_CAPTURE_CLOCK + " ")]
                drain = drained or drain
                clock = [x for x in pending if x.startswith(_CAPTURE_CLOCK + " ")][-1:] or clock
                report = (*drain, *clock)
            pending = []
        elif len(pending) < 32:
            pending.append(line.decode("ascii"))
    return Stream(boot_id, inode, start, bytes(run), report, last_round, left)


def stream_snapshot_text(stream: Stream, cursor: Cursor) -> str | None:
    """collect_script's output for what the copy holds after `cursor`; None when it does not
    hold all of it (no complete round, another boot, a gap, or a copy behind the file): then
    SSH must collect."""
    if stream.round is None or stream.inode is None or not stream.boot_id or stream.left:
        return None
    if cursor.boot_id not in ("", stream.boot_id):
        return None  # a reboot since the last collection: the SSH collection knows them
    # Another file than the cursor's is read whole, as the collection's script does.
    offset = cursor.events_offset if cursor.events_inode == stream.inode else 0
    if not stream.start <= offset <= stream.start + len(stream.data):
        return None
    body = stream.data[offset - stream.start :][:EVENTS_CHUNK_BYTES]
    whole = body.rfind(b"\n") + 1  # the drain writes whole lines; a chunk may end in one
    end = offset + whole
    clock = next((x.split() for x in stream.report if x.startswith(_CAPTURE_CLOCK + " ")), [])
    if len(clock) != 3:
        return None
    return "\n".join(
        [
            f"{_BOOT} {stream.boot_id}",
            *(line for line in stream.report if line.split(" ", 1)[0] in _STREAM_REPORT),
            f"{_EVENTS_POS} {stream.inode} {end} {stream.start + len(stream.data)}",
            _EVENTS,
            body[:whole].decode("utf-8", "replace"),
            f"{_CLOCK} {clock[2]} {clock[1]}",
            _END,
            "",
        ]
    )


def collect_stream(stream: Stream, cursor: Cursor, *, final: bool = False) -> Collected | None:
    """collect_full's result from the host's copy; None if the copy cannot give all of it."""
    text = stream_snapshot_text(stream, cursor)
    return None if text is None else process(parse_snapshot(text), cursor, final=final)


def stream_files(path: str | Path, files: HostFiles | None = None) -> list[str]:
    """The host's copy: virtlogd's rotated files (NAME.N, the oldest first), then NAME; on this
    machine, or on the remote libvirt host `files` reaches. virtlogd renames NAME.N to NAME.N+1
    as it rotates, so they are probed from NAME.0 up to the first one missing."""
    files = files or LOCAL
    name = str(path)
    rotated = []
    for number in range(_STREAM_MAX_ROTATED):
        if files.stat(f"{name}.{number}") is None:
            break
        rotated.append(f"{name}.{number}")
    return [*reversed(rotated), name]


def read_stream(
    path: str | Path, limit: int = STREAM_READ_BYTES, files: HostFiles | None = None
) -> bytes:
    """The newest `limit` bytes of the host's copy, across virtlogd's rotations."""
    files = files or LOCAL
    chunks: list[bytes] = []
    left = limit
    for file in reversed(stream_files(path, files)):
        if left <= 0:
            break
        try:
            with files.open_read(file) as reader:
                start = max(0, reader.size - left)
                chunks.append(reader.read_at(start, reader.size - start))
        except SandboxError:
            continue
        left -= len(chunks[-1])
    return b"".join(reversed(chunks))


_ROUND_LINE = re.compile(rb"\n@@round ([0-9]{1,19}) [!-~]{1,64}(?: ([0-9]{1,19}))?(?=\n)")


def stream_round(path: str | Path, files: HostFiles | None = None) -> tuple[int, int] | None:
    """The number of the last round the host's copy holds, and the bytes of the guest's file
    it had not copied yet (None: no round), read from the copy's end."""
    files = files or LOCAL
    try:
        with files.open_read(str(path)) as reader:
            start = max(0, reader.size - 65536)
            tail = reader.read_at(start, reader.size - start)
    except SandboxError:
        return None
    found = _ROUND_LINE.findall(tail)
    return (int(found[-1][0]), int(found[-1][1] or 0)) if found else None


# ---- the side effect -------------------------------------------------------------------------


def collect_full(guest: Guest, cursor: Cursor, *, final: bool = False) -> Collected:
    """One SSH command: the new attempts since `cursor`, the next cursor and any losses seen."""
    text = guest.check(["sh", "-c", collect_script(cursor)], timeout=COLLECT_TIMEOUT)
    return process(parse_snapshot(text), cursor, final=final)


def collect(guest: Guest, cursor: Cursor) -> tuple[list[Attempt], Cursor]:
    collected = collect_full(guest, cursor)
    return collected.attempts, collected.cursor
