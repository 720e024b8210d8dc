"""Connection attempts in the guest: captured from the kernel's own events, collected over SSH,
joined into `records.Attempt`s.

Two sources, both written by the guest's kernel at the moment of the attempt:
- the firewall's LOG records (orchestrator/firewall.py: SBX-ALLOW, SBX-BLOCK, SBX-DNS for the
  first packet of a flow, SBX-ALLOW-EST and SBX-DNS-EST for the next ones of an answered UDP flow;
  the boot rules' SBX-BOOT) in the kernel log, read from /dev/kmsg: the verdict, protocol,
  addresses and ports, and the socket owner's uid. Each record has a sequence number, so a
  collection takes each record exactly once and sees any it missed (a gap, or a buffer that
  wrapped) instead of guessing.
- auditd's connect() events (images/rootfs/etc/audit/rules.d/audit.rules, key sbx-connect),
  read with `ausearch --raw` from where the last collection ended: which process (pid, ppid,
  uid, exe, PROCTITLE) made it.
  PHP's connects are non-blocking, so audit says EINPROGRESS for allowed and blocked alike: the
  verdict always comes from the firewall record.

A firewall record is joined with the audit event of the same destination address and port (and
uid), in time order, within JOIN_WINDOW (see join() for records that may not be attempts).
Parsing and joining are pure functions of the text the guest returns; `collect` is the one side
effect: one SSH command per collection.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import logging
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Self

from . import firewall
from .errors import GuestError
from .records import Attempt, DnsQuery, Verdict, iso_time, parse_time

if TYPE_CHECKING:
    from .guest import Guest

log = logging.getLogger(__name__)

AUDIT_KEY = "sbx-connect"
# How many rules carry AUDIT_KEY in images/rootfs/etc/audit/rules.d/audit.rules: each collection
# counts them in the guest, which guest root can change.
AUDIT_RULES = 6
LOG_BOOT = "SBX-BOOT "
# The second flag: a packet of a flow conntrack already knew (firewall.LOG_ALLOW_EST), never an
# attempt by itself, only with a connect() of its own.
_PREFIXES: dict[str, tuple[Verdict, bool]] = {
    firewall.LOG_ALLOW: (Verdict.ALLOWED, False),
    firewall.LOG_BLOCK: (Verdict.BLOCKED, False),
    firewall.LOG_DNS: (Verdict.DNS, False),
    LOG_BOOT: (Verdict.BOOT, False),
    firewall.LOG_ALLOW_EST: (Verdict.ALLOWED, True),
    firewall.LOG_DNS_EST: (Verdict.DNS, True),
}

# A firewall record and its audit event are taken within one syscall; the two clocks (the kernel
# log's monotonic stamp converted to wall time, audit's coarse wall clock) differ by far less.
JOIN_WINDOW = 2.0
# A firewall record may be read before auditd has written its event: records younger than this
# at collection time wait for the next collection (kept in the cursor) before they go out alone.
SETTLE_SECONDS = 3.0
# TCP retries its SYN (and a blocked UDP flow resends) as long as this; every copy is NEW to
# conntrack and logged again: they are the same attempt.
FLOW_MEMORY_SECONDS = 180.0
# Audit events reach the log out of serial order: across CPUs slightly, and by thousands when
# kauditd could not hand records to a busy auditd and sent them again later (its retry queue).
# Each collection re-reads the end of what the last one read (AUDIT_REREAD_BYTES) and drops the
# events it has seen: the serials of this many of the last events read, in the log's order.
AUDIT_SEEN = 4096

COLLECT_TIMEOUT = 120.0
# The longest a collection waits for auditd to write its flush marker (see collect_script).
DRAIN_SECONDS = 30.0
START_TIMEOUT = 60.0

# Each packet a socket sends takes the next IPv4 ID; a little slack for packets that were not
# logged. A new socket on the same flow starts at a random ID: 4 in 65536 look like a resend.
_RESEND_ID_STEP = 4
_RESEND_MIN_SECONDS = 0.5
_INET = {2: 4, 10: 6}  # AF_INET, AF_INET6 → family
_EINPROGRESS = -115
_NOT_REFUSED = {0, _EINPROGRESS, -114, -106}  # ok, EINPROGRESS, EALREADY, EISCONN

START_HINT = (
    "the guest image may predate connection capture: rebuild it with "
    "`sandbox image build --force` and create the sandbox again"
)

# Started after the policy is loaded (every earlier attempt is still in the kernel log as
# SBX-BOOT). The auditd unit's ExecStartPost runs `augenrules --load`; the rule list is read back.
START_SCRIPT = f"""\
set -u
systemctl start auditd.service || {{ echo "auditd did not start" >&2; exit 1; }}
rules=$(auditctl -l) || exit 1
case "$rules" in
  *"key={AUDIT_KEY}"*) ;;
  *) echo "the audit rules for connect are not loaded; auditctl -l says:" >&2
     echo "$rules" >&2; exit 1 ;;
esac
auditctl -s | grep -qx 'enabled 1' || {{ echo "auditing is not enabled" >&2; exit 1; }}
"""
START_COMMAND: list[str] = ["sh", "-c", START_SCRIPT]


def start(guest: Guest) -> None:
    """Start auditd with our rules in the guest; GuestError if the rules are not in place."""
    try:
        guest.check(START_COMMAND, timeout=START_TIMEOUT)
    except GuestError as error:
        raise GuestError(
            f"could not start connection capture: {error.message}", START_HINT
        ) from None


# ---- the collection command ------------------------------------------------------------------

# Section markers on lines of their own; the awk filters keep every other line away from them.
_BOOT, _AUDIT_POS, _CLOCK, _AUDIT_STATUS, _AUDIT, _KMSG, _KMSG_ERR, _END = (
    "@@boot",
    "@@auditpos",
    "@@clock",
    "@@auditstatus",
    "@@audit",
    "@@kmsg",
    "@@kmsgerr",
    "@@end",
)

AUDIT_LOG = "/var/log/audit/audit.log"
# Each collection reads the audit log from where the last one ended (a re-read of the whole log
# took seconds more per 10,000 connects logged): from this many bytes before the end, which holds
# any event auditd was still writing (far fewer than AUDIT_SEEN events).
AUDIT_REREAD_BYTES = 256 * 1024


def audit_log_script(inode: int, offset: int, log_path: str = AUDIT_LOG) -> str:
    """Shell that prints `@@auditpos INODE SIZE` of the audit log, then on stdout the raw log from
    byte `offset` of the file `inode` onwards: if auditd rotated since (max_log_file), the rest of
    the rotated file and every newer one first; a file never seen (inode 0, or gone) is read
    whole. A read that starts inside a line drops that line (an earlier collection read it)."""
    return f"""\
a={shlex.quote(log_path)}; ino={inode}; off={offset}
set -- $(stat -c '%i %s' "$a" 2>/dev/null || echo 0 0); cur=$1; size=$2
echo "@@auditpos $cur $size" >&2
# rest FILE OFFSET [SIZE]: bytes OFFSET..SIZE of FILE (tail seeks: only new bytes are read)
rest() {{
  tail -c +$(($2 + 1)) "$1" | if [ -n "${{3:-}}" ]; then head -c $(($3 - $2)); else cat; fi |
    if [ "$2" -gt 0 ]; then tail -n +2; else cat; fi
}}
if [ "$cur" != "$ino" ]; then
  # oldest first: audit.log.N is older the higher N
  files=$(ls "$a".* 2>/dev/null | awk -F. '{{ print $NF, $0 }}' | sort -k1,1rn | cut -d' ' -f2-)
  take=1
  for f in $files; do [ "$(stat -c %i "$f")" = "$ino" ] && take=0; done
  for f in $files; do
    if [ "$(stat -c %i "$f")" = "$ino" ]; then take=1; rest "$f" "$off"
    elif [ $take = 1 ]; then cat "$f"; fi
  done
  off=0
fi
[ "$size" -ge "$off" ] || off=0
if [ "$size" -gt 0 ]; then rest "$a" "$off" "$size"; fi
"""


# /dev/kmsg records ("prio,seq,usec,flags;text", continuation lines start with a space): the
# firewall's ones above `after`, plus the first and last sequence numbers read and every break in
# the sequence, which is how loss is seen. And the newest clock mark (below).
_KMSG_AWK = r"""
/^ / { next }
{
  i = index($0, ";"); split(substr($0, 1, i - 1), h, ",")
  seq = h[2] + 0
  if (n == 0) print "@@first " h[2]
  else if (seq != prev + 1) print "@@gap " prev " " h[2]
  n++; prev = seq
  if (seq > after + 0 && substr($0, i + 1, 4) == "SBX-") print h[2] " " h[3] " " substr($0, i + 1)
  if (substr($0, i + 1, 10) == "sbx-clock ") mark = h[3] " " substr($0, i + 11)
}
END { if (n > 0) print "@@last " prev; if (mark != "") print "@@mark " mark }
"""


def collect_script(cursor: Cursor) -> str:
    """The one shell command a collection runs in the guest (as root).

    The audit log is read before the kernel log: a connect's firewall record is in the kernel log
    before its syscall returns, so every audit event read has its firewall record in this
    collection or an earlier one. Each /dev/kmsg read() returns one record; O_NONBLOCK ends the
    read at the newest one (dd then reports EAGAIN, which is expected).
    """
    return "\n".join(
        [
            "export LC_ALL=C",
            f'echo "{_BOOT} $(cat /proc/sys/kernel/random/boot_id)"',
            "status=$(auditctl -s 2>&1)",
            f'echo {_AUDIT_STATUS}; echo "$status"',
            f"rules=$(auditctl -l 2>/dev/null | grep -c 'key={AUDIT_KEY}'); echo \"rules $rules\"",
            # Reported above as found; put back for what follows (a reboot, or guest root, may
            # have stopped auditd or changed the rules). A restarted auditd gets the records the
            # kernel held meanwhile.
            """echo "$status" | grep -qx 'enabled 0' && auditctl -e 1 >/dev/null""",
            """if echo "$status" | grep -qx 'pid 0';"""
            " then systemctl start auditd.service >/dev/null 2>&1;"
            f' elif [ "$rules" != {AUDIT_RULES} ]; then augenrules --load >/dev/null 2>&1; fi',
            # Records not in the log yet: in the kernel's queues (after a burst auditd can be
            # seconds behind; kauditd re-sends what auditd could not take only when it next
            # wakes), or in auditd. A marker sent now through the same queues comes out after
            # all of them: wait until auditd has written it.
            'mark="sbx-flush-$(cat /proc/sys/kernel/random/uuid)"',
            'if auditctl -m "$mark" 2>/dev/null; then',
            f"  i=0; while [ $i -lt {int(DRAIN_SECONDS * 10)} ] &&"
            f' ! tail -c {AUDIT_REREAD_BYTES} {AUDIT_LOG} | grep -qF "$mark";'
            " do sleep 0.1; i=$((i + 1)); done",
            "fi",
            f"echo {_AUDIT}",
            # ausearch reads the raw log from stdin; the position goes to stderr and after.
            f"{{ {audit_log_script(cursor.audit_inode, cursor.audit_offset)}}} 2>/run/sbx-pos"
            f" | ausearch -k {AUDIT_KEY} --raw 2>/dev/null",
            "cat /run/sbx-pos",
            'read up idle < /proc/uptime; echo "' + _CLOCK + ' $(date +%s.%N) $up"',
            # The kernel log's stamps are its own monotonic clock, which drifts from the wall
            # clock (measured under TCG: ~0.1 s after two minutes against /proc/uptime). A mark
            # written now carries both clocks; /proc/uptime is the fallback.
            'echo "<14>sbx-clock $(date +%s.%N)" > /dev/kmsg',
            f"echo {_KMSG}",
            "dd if=/dev/kmsg iflag=nonblock bs=65536 status=none 2>/run/sbx-kmsg.err"
            f" | awk -v after={cursor.kmsg_seq} {shlex.quote(_KMSG_AWK)}",
            f"echo {_KMSG_ERR}; grep -v 'Resource temporarily unavailable' /run/sbx-kmsg.err",
            f"echo {_END}",
        ]
    )


# ---- raw records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FirewallRecord:
    seq: int  # the kernel log's sequence number
    time: float  # wall clock, epoch seconds (converted from the kernel's monotonic stamp)
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

    def flow(self) -> str:
        return f"{self.proto} {self.src} {self.sport} {self.dst} {self.dport}"


@dataclass(frozen=True)
class AuditConnect:
    serial: int
    time: float
    family: int  # 4 | 6 (IPv4-mapped IPv6 addresses count as 4: that is what leaves the guest)
    dst: str
    dport: int
    exit: int
    pid: int | None
    ppid: int | None
    uid: int | None
    exe: str | None
    cmdline: str | None


_FIELD = re.compile(r'(\w+)=("[^"]*"|\S*)')
_MSG = re.compile(r"msg=audit\((\d+(?:\.\d+)?):(\d+)\)")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_PROTO_NAMES = {
    "TCP": "tcp",
    "UDP": "udp",
    "ICMP": "icmp",
    "ICMPV6": "icmpv6",
    "UDPLITE": "udplite",
}


def _fields(text: str) -> dict[str, str]:
    # ENRICHED logs append interpreted fields after a GS (0x1d) byte: the raw part is enough.
    return {m.group(1): m.group(2) for m in _FIELD.finditer(text.split("\x1d", 1)[0])}


def _untagged(value: str) -> str | None:
    """An audit string field: quoted text as is, unquoted text is hex (used when the value has
    spaces or control characters), `(null)` or `?` is nothing."""
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        return value[1:-1]
    if value in ("(null)", "?", "(none)", ""):
        return None
    if _HEX.fullmatch(value):
        return bytes.fromhex(value).decode("utf-8", "replace")
    return value


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def decode_proctitle(value: str) -> str | None:
    """PROCTITLE's argv (NUL-separated, hex when it has NULs or spaces) as a shell-quoted line.
    The kernel keeps at most the first 128 bytes."""
    text = _untagged(value)
    if text is None:
        return None
    return shlex.join(arg for arg in text.split("\0") if arg) or None


def decode_sockaddr(hex_text: str) -> tuple[int, str, int] | None:
    """(family, address, port) of an AF_INET/AF_INET6 sockaddr in audit's hex; None for any
    other family (AF_UNIX, netlink, AF_UNSPEC disconnects)."""
    if not _HEX.fullmatch(hex_text):
        return None
    raw = bytes.fromhex(hex_text)
    if len(raw) < 2:
        return None
    family = _INET.get(int.from_bytes(raw[:2], "little"))
    if family == 4 and len(raw) >= 8:
        return 4, str(ipaddress.IPv4Address(raw[4:8])), int.from_bytes(raw[2:4], "big")
    if family == 6 and len(raw) >= 24:
        address = ipaddress.IPv6Address(raw[8:24])
        port = int.from_bytes(raw[2:4], "big")
        if address.ipv4_mapped is not None:
            return 4, str(address.ipv4_mapped), port
        return 6, str(address), port
    return None


# connect's syscall number per audit arch: x86_64, and i386 (connect, and socketcall whose a0=3
# is SYS_CONNECT).
_CONNECT_SYSCALLS = {"c000003e": {"42"}, "40000003": {"362", "102"}}


def _is_connect(syscall: dict[str, str]) -> bool:
    number = syscall.get("syscall", "")
    if number not in _CONNECT_SYSCALLS.get(syscall.get("arch", ""), set()):
        return False
    return number != "102" or syscall.get("a0") == "3"


def parse_audit(text: str) -> list[AuditConnect]:
    """`ausearch --raw` output → the inet connect events in it (one per serial, in the order of
    their first record)."""
    events: dict[int, dict[str, dict[str, str]]] = {}
    times: dict[int, float] = {}
    for line in text.splitlines():
        match = _MSG.search(line)
        if not match or not line.startswith("type="):
            continue
        kind = line[5 : line.index(" ")] if " " in line else line[5:]
        serial = int(match.group(2))
        times[serial] = float(match.group(1))
        events.setdefault(serial, {})[kind] = _fields(line[match.end() :])
    result = []
    for serial in events:  # the log's order (see AUDIT_SEEN)
        records = events[serial]
        syscall, sockaddr = records.get("SYSCALL"), records.get("SOCKADDR")
        # `ausearch -k` also returns other events naming the key (auditctl's own rule changes).
        if syscall is None or sockaddr is None or not _is_connect(syscall):
            continue
        target = decode_sockaddr(sockaddr.get("saddr", ""))
        if target is None:
            continue
        family, dst, dport = target
        proctitle = records.get("PROCTITLE", {}).get("proctitle")
        result.append(
            AuditConnect(
                serial=serial,
                time=times[serial],
                family=family,
                dst=dst,
                dport=dport,
                exit=_int(syscall.get("exit")) or 0,
                pid=_int(syscall.get("pid")),
                ppid=_int(syscall.get("ppid")),
                uid=_int(syscall.get("uid")),
                exe=_untagged(syscall.get("exe", "")),
                cmdline=decode_proctitle(proctitle) if proctitle else None,
            )
        )
    return result


def parse_firewall_line(line: str, boot_offset: float) -> FirewallRecord | None:
    """One line of the collection's kernel-log section, `SEQ USEC TEXT`; None if TEXT is not one
    of our firewall records. boot_offset: wall clock minus the kernel log's clock, in seconds."""
    seq_text, usec_text, text = [*line.split(" ", 2), "", ""][:3]
    kind = next((v for p, v in _PREFIXES.items() if text.startswith(p)), None)
    if kind is None or not seq_text.isdigit() or not usec_text.isdigit():
        return None
    verdict, established = kind
    values = dict(part.split("=", 1) for part in text.split() if "=" in part)
    try:
        # IPv6 addresses come fully expanded (2001:0db8:0001:...): compare them canonical.
        address = ipaddress.ip_address(values.get("DST", ""))
        src = str(ipaddress.ip_address(values["SRC"])) if "SRC" in values else None
    except ValueError:
        return None
    dst, family = str(address), address.version
    proto_text = values.get("PROTO", "")
    proto = _PROTO_NAMES.get(proto_text.upper(), proto_text.lower() or "unknown")
    ports = proto in ("tcp", "udp", "udplite", "sctp")
    return FirewallRecord(
        seq=int(seq_text),
        time=boot_offset + int(usec_text) / 1e6,
        verdict=verdict,
        proto=proto,
        family=family,
        src=src,
        dst=dst,
        sport=_int(values.get("SPT")) if ports else None,
        dport=_int(values.get("DPT")) if ports else None,
        uid=_int(values.get("UID")),
        # ICMP echo records have an ID of their own after the header's; the first is the header's.
        ident=_int(_first_value(text, "ID")) if family == 4 else None,
        established=established,
    )


def _first_value(text: str, key: str) -> str | None:
    match = re.search(rf"(?:^| ){key}=(\S*)", text)
    return match.group(1) if match else None


# ---- the collection's output -----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What one run of collect_script returned, parsed."""

    boot_id: str
    wall: float  # the guest's wall clock (epoch seconds) when it ran
    uptime: float
    audit_running: bool
    audit_lost: int | None
    audit_rules: int | None  # rules with AUDIT_KEY loaded (None: not reported)
    # The audit log's inode and size when read (None: not reported, as by an older collector).
    audit_inode: int | None
    audit_size: int | None
    audit: tuple[AuditConnect, ...]
    firewall: tuple[FirewallRecord, ...]
    kmsg_first: int | None  # the oldest record /dev/kmsg still held
    kmsg_last: int | None  # the newest record read
    kmsg_gaps: tuple[tuple[int, int], ...]  # (last read, next read) where the sequence jumped
    kmsg_error: str


def parse_snapshot(text: str) -> Snapshot:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    clock: list[str] = []
    boot_id = ""
    audit_pos: list[str] = []
    for line in text.splitlines():
        if line.startswith(_AUDIT_POS + " "):
            audit_pos = line.split()[1:]
            continue
        if line.startswith(_CLOCK + " "):
            clock = line.split()[1:]
            continue
        if line.startswith(_BOOT + " "):
            boot_id = line.split()[1]
            continue
        if line in (_AUDIT_STATUS, _AUDIT, _KMSG, _KMSG_ERR, _END):
            current = sections.setdefault(line, [])
            continue
        if current is not None:
            current.append(line)
    if _END not in sections or len(clock) != 2:
        raise GuestError(
            "the connection capture's output from the guest is incomplete",
            "the guest may be out of memory or disk; check `sandbox exec -- df -h /var/log`",
        )
    wall, uptime = float(clock[0]), float(clock[1])
    status = dict([*line.split(" ", 1), ""][:2] for line in sections.get(_AUDIT_STATUS, []) if line)
    first = last = None
    gaps: list[tuple[int, int]] = []
    lines = []
    offset = wall - uptime
    for line in sections.get(_KMSG, []):
        if line.startswith("@@first "):
            first = int(line.split()[1])
        elif line.startswith("@@last "):
            last = int(line.split()[1])
        elif line.startswith("@@gap "):
            _, before, after = line.split()
            gaps.append((int(before), int(after)))
        elif line.startswith("@@mark "):
            _, usec, mark_wall = line.split()
            offset = float(mark_wall) - int(usec) / 1e6
        else:
            lines.append(line)
    records = [r for r in (parse_firewall_line(line, offset) for line in lines) if r is not None]
    return Snapshot(
        boot_id=boot_id,
        wall=wall,
        uptime=uptime,
        audit_running=status.get("enabled") in ("1", "2") and status.get("pid", "0") != "0",
        audit_lost=_int(status.get("lost")),
        audit_rules=_int(status.get("rules")),
        audit_inode=_int(audit_pos[0]) if len(audit_pos) == 2 else None,
        audit_size=_int(audit_pos[1]) if len(audit_pos) == 2 else None,
        audit=tuple(parse_audit("\n".join(sections.get(_AUDIT, [])))),
        firewall=tuple(records),
        kmsg_first=first,
        kmsg_last=last,
        kmsg_gaps=tuple(gaps),
        kmsg_error="\n".join(sections.get(_KMSG_ERR, [])).strip(),
    )


# ---- cursor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """How far the guest's logs have been collected; kept on the host between collections
    (paths.CAPTURE_CURSOR).

    boot_id: the guest boot the positions belong to (a reboot starts them again). kmsg_seq: the
    last kernel log record read (-1: none yet). audit_inode, audit_offset: the audit log file and
    the byte the next collection reads it from (0, 0: all of it). audit_seen: the serials of the
    last AUDIT_SEEN connect events read, in the log's order (the next collection re-reads some).
    pending / pending_audit: items read but not emitted yet, waiting for their other half.
    flows: recently logged flows → [time, IPv4 ID or None] of their last record (a resent packet
    is logged again).
    losses: every loss ever detected, for `sandbox logs` to show next to the records.
    """

    boot_id: str = ""
    kmsg_seq: int = -1
    audit_seen: tuple[int, ...] = ()
    audit_lost: int = 0
    audit_inode: int = 0
    audit_offset: int = 0
    pending: tuple[dict[str, Any], ...] = ()
    pending_audit: tuple[dict[str, Any], ...] = ()
    flows: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    losses: tuple[str, ...] = ()

    def to_json(self) -> str:
        value = asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in value.items()})

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            value = json.loads(text)
            return cls(
                boot_id=str(value.get("boot_id", "")),
                kmsg_seq=int(value["kmsg_seq"]),
                audit_seen=tuple(int(s) for s in value.get("audit_seen", [])),
                audit_lost=int(value.get("audit_lost", 0)),
                audit_inode=int(value.get("audit_inode", 0)),
                audit_offset=int(value.get("audit_offset", 0)),
                pending=tuple(dict(p) for p in value.get("pending", [])),
                pending_audit=tuple(dict(p) for p in value.get("pending_audit", [])),
                flows={
                    str(k): (float(t), None if i is None else int(i))
                    for k, (t, i) in value.get("flows", {}).items()
                },
                losses=tuple(str(s) for s in value.get("losses", [])),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise GuestError(
                f"the capture cursor is damaged: {error!r}",
                "remove the sandbox's logs/capture-cursor.json; the next collection then takes "
                "the guest's logs from the start again",
            ) from None


def _to_json(item: FirewallRecord | AuditConnect) -> dict[str, Any]:
    value = asdict(item)
    if isinstance(item, FirewallRecord):
        value["verdict"] = item.verdict.value
    return value


def _record_from_json(value: dict[str, Any]) -> FirewallRecord:
    return FirewallRecord(**{**value, "verdict": Verdict(value["verdict"])})


def _event_from_json(value: dict[str, Any]) -> AuditConnect:
    return AuditConnect(**value)


# ---- the join (pure) -------------------------------------------------------------------------


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _attempt(record: FirewallRecord | None, event: AuditConnect | None, boot_id: str) -> Attempt:
    # Ids carry the boot: sequence numbers and serials start again when the guest reboots.
    boot = boot_id.replace("-", "")[:8]
    if record is not None:
        return Attempt(
            id=f"k{record.seq}.{boot}",
            # audit's clock is the guest's wall clock itself; the kernel log's is converted.
            time=iso_time(event.time if event is not None else record.time),
            verdict=record.verdict,
            proto=record.proto,
            family=record.family,
            dst=record.dst,
            dport=record.dport,
            src=record.src,
            sport=record.sport,
            uid=event.uid if event is not None else record.uid,
            pid=event.pid if event else None,
            ppid=event.ppid if event else None,
            exe=event.exe if event else None,
            cmdline=event.cmdline if event else None,
            evidence="audit+firewall" if event else "firewall",
        )
    assert event is not None
    loopback = _loopback(event.dst)
    return Attempt(
        id=f"a{event.serial}.{boot}",
        time=iso_time(event.time),
        verdict=Verdict.LOOPBACK if loopback else Verdict.BLOCKED,
        # audit does not say which protocol the socket speaks. A connect the kernel refused
        # before sending anything is TCP in practice (a UDP connect sends nothing to refuse).
        proto="" if loopback else "tcp",
        family=event.family,
        dst=event.dst,
        dport=event.dport,
        uid=event.uid,
        pid=event.pid,
        ppid=event.ppid,
        exe=event.exe,
        cmdline=event.cmdline,
        evidence="audit",
    )


def _matches(record: FirewallRecord, event: AuditConnect) -> bool:
    return (
        record.dst == event.dst
        and record.dport == event.dport
        and (record.uid is None or event.uid is None or record.uid == event.uid)
        and abs(record.time - event.time) <= JOIN_WINDOW
    )


def join(
    records: Sequence[FirewallRecord], events: Sequence[AuditConnect]
) -> list[tuple[FirewallRecord | None, AuditConnect | None]]:
    """Pair firewall records with audit connects, each used at most once.

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
    by_key: dict[tuple[str, int | None], list[AuditConnect]] = {}
    for event in sorted(events, key=lambda e: (e.time, e.serial)):
        by_key.setdefault((event.dst, event.dport), []).append(event)
    records_by_key: dict[tuple[str, int | None], list[FirewallRecord]] = {}
    for record in sorted(records, key=lambda r: r.seq):
        records_by_key.setdefault((record.dst, record.dport), []).append(record)
    paired: dict[int, AuditConnect] = {}  # record seq → its event
    for key, key_records in records_by_key.items():
        key_events = by_key.get(key, [])
        for record_index, event_index in _join_key(key_records, key_events):
            paired[key_records[record_index].seq] = key_events[event_index]
    used = {event.serial for event in paired.values()}
    pairs: list[tuple[FirewallRecord | None, AuditConnect | None]] = [
        (record, paired.get(record.seq)) for record in sorted(records, key=lambda r: r.seq)
    ]
    pairs += [(None, e) for e in events if e.serial not in used]
    return pairs


# How many retry records an event left over tries, nearest first, before it stays alone.
_AUGMENT_TRIES = 32


def _join_key(
    records: Sequence[FirewallRecord], events: Sequence[AuditConnect]
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
    events: Sequence[AuditConnect],
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


def _loss_warnings(snapshot: Snapshot, cursor: Cursor, rebooted: bool) -> list[str]:
    stamp = iso_time(snapshot.wall)
    warnings = []
    if rebooted:
        warnings.append(
            f"{stamp}: the guest rebooted since the last collection: kernel log records of the "
            "previous boot that were not collected are lost"
        )
    # The oldest record still held is past the one we expected next, or the sequence jumped while
    # we read (the ring buffer wrapped under the reader).
    expected = cursor.kmsg_seq + 1
    if snapshot.kmsg_first is not None and snapshot.kmsg_first > expected:
        warnings.append(
            f"{stamp}: kernel log records {expected}..{snapshot.kmsg_first - 1} were overwritten "
            "before they were collected: firewall records among them are lost"
        )
    for before, after in snapshot.kmsg_gaps:
        if after > expected:
            warnings.append(
                f"{stamp}: kernel log records {before + 1}..{after - 1} were overwritten while "
                "they were read: firewall records among them are lost"
            )
    if snapshot.kmsg_error:
        warnings.append(f"{stamp}: reading the kernel log failed: {snapshot.kmsg_error}")
    if not snapshot.audit_running:
        warnings.append(
            f"{stamp}: auditd was not running in the guest (stopped by guest root, or the guest "
            "rebooted): attempts since the last collection may have no process attribution; the "
            "collection started it again"
        )
    elif snapshot.audit_rules is not None and snapshot.audit_rules != AUDIT_RULES:
        warnings.append(
            f"{stamp}: {snapshot.audit_rules} of the {AUDIT_RULES} audit rules for connect() were "
            "loaded in the guest (guest root changed them): attempts since the last collection "
            "may have no process attribution; the collection loaded them again"
        )
    if snapshot.audit_lost is not None and snapshot.audit_lost > cursor.audit_lost:
        warnings.append(
            f"{stamp}: the kernel dropped {snapshot.audit_lost - cursor.audit_lost} audit records "
            "(backlog full): some attempts have no process attribution"
        )
    return warnings


def process(snapshot: Snapshot, cursor: Cursor, *, final: bool = False) -> Collected:
    """Turn one collection's raw material into attempts, exactly once given the cursor.

    Items that may still get their other half (a firewall record whose audit event auditd has
    not written yet, a UDP connect whose first datagram has not left yet) wait in the cursor for
    the next collection while younger than SETTLE_SECONDS; `final` (at destroy) holds nothing back.
    """
    rebooted = bool(cursor.boot_id) and snapshot.boot_id != cursor.boot_id
    if rebooted:
        # Sequence numbers and audit serials start again at every boot; the audit log is kept.
        cursor = Cursor(
            losses=cursor.losses, audit_inode=cursor.audit_inode, audit_offset=cursor.audit_offset
        )
    warnings = _loss_warnings(snapshot, cursor, rebooted)
    boot_time = snapshot.wall - snapshot.uptime

    seen = set(cursor.audit_seen)
    # The audit log outlives a reboot (the disk is kept); events of an earlier boot are not ours.
    fresh_events = [
        e for e in snapshot.audit if e.serial not in seen and e.time >= boot_time - JOIN_WINDOW
    ]
    events = [_event_from_json(p) for p in cursor.pending_audit] + fresh_events

    flows = {k: v for k, v in cursor.flows.items() if v[0] > snapshot.wall - FLOW_MEMORY_SECONDS}
    records = [_record_from_json(p) for p in cursor.pending]
    for record in sorted(snapshot.firewall, key=lambda r: r.seq):
        if record.seq <= cursor.kmsg_seq:
            continue
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

    attempts: list[Attempt] = []
    pending: list[FirewallRecord] = []
    pending_audit: list[AuditConnect] = []
    young = snapshot.wall - SETTLE_SECONDS
    for half, event in pairs:
        if half is not None and event is None and not final and half.time > young:
            pending.append(half)  # its connect may not be in the audit log yet
        elif half is not None and event is None and half.retry:
            continue
        elif half is None and event is not None and not _audit_only(event):
            if not final and event.time > young:
                pending_audit.append(event)  # a UDP connect whose first datagram may follow
        else:
            attempts.append(_attempt(half, event, snapshot.boot_id))
    attempts.sort(key=lambda a: (a.time, a.id))

    read = [*cursor.audit_seen, *(e.serial for e in snapshot.audit if e.serial not in seen)]
    kmsg_seq = max([cursor.kmsg_seq, *(r.seq for r in snapshot.firewall)])
    if snapshot.kmsg_last is not None:
        kmsg_seq = max(kmsg_seq, snapshot.kmsg_last)
    new_cursor = Cursor(
        boot_id=snapshot.boot_id,
        kmsg_seq=kmsg_seq,
        audit_seen=tuple(read[-AUDIT_SEEN:]),
        audit_lost=snapshot.audit_lost if snapshot.audit_lost is not None else cursor.audit_lost,
        **_next_audit_position(snapshot, cursor),
        pending=tuple(_to_json(r) for r in pending),
        pending_audit=tuple(_to_json(e) for e in pending_audit),
        flows=flows,
        losses=cursor.losses + tuple(warnings),
    )
    for warning in warnings:
        log.warning("connection capture: %s", warning)
    return Collected(attempts, new_cursor, warnings)


def _next_audit_position(snapshot: Snapshot, cursor: Cursor) -> dict[str, int]:
    if snapshot.audit_inode is None or snapshot.audit_size is None:
        return {"audit_inode": cursor.audit_inode, "audit_offset": cursor.audit_offset}
    start = cursor.audit_offset if snapshot.audit_inode == cursor.audit_inode else 0
    if snapshot.audit_size < start:
        start = 0  # the file was truncated: it was read whole
    offset = max(snapshot.audit_size - AUDIT_REREAD_BYTES, start)
    return {"audit_inode": snapshot.audit_inode, "audit_offset": offset}


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


def _audit_only(event: AuditConnect) -> bool:
    """Whether an audit connect with no firewall record is an attempt of its own: to loopback
    (never logged by the firewall), or refused by the kernel before any packet (no route). A
    non-blocking or successful connect with no packet is a UDP socket that never sent."""
    return _loopback(event.dst) or event.exit not in _NOT_REFUSED


# ---- DNS names -------------------------------------------------------------------------------


def attach_dns_names(attempts: Iterable[Attempt], queries: Iterable[DnsQuery]) -> list[Attempt]:
    """Each attempt with dns_name set from the latest query before it whose answer held its
    destination (attempts that already have a name keep it)."""
    answers: dict[str, list[tuple[float, str]]] = {}
    for query in queries:
        when = parse_time(query.time).timestamp()
        for address in query.addresses():
            answers.setdefault(address, []).append((when, query.name))
    for entries in answers.values():
        entries.sort()
    result = []
    for attempt in attempts:
        entries = answers.get(_canonical(attempt.dst), [])
        if attempt.dns_name is None and entries:
            when = parse_time(attempt.time).timestamp()
            index = bisect.bisect_right(entries, (when, "\uffff"))
            if index:
                attempt = replace(attempt, dns_name=entries[index - 1][1])
        result.append(attempt)
    return result


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


# ---- the side effect -------------------------------------------------------------------------


def collect_full(guest: Guest, cursor: Cursor, *, final: bool = False) -> Collected:
    """One SSH command: the new attempts since `cursor`, the next cursor and any losses seen."""
    text = guest.check(["sh", "-c", collect_script(cursor)], timeout=COLLECT_TIMEOUT)
    return process(parse_snapshot(text), cursor, final=final)


def collect(guest: Guest, cursor: Cursor) -> tuple[list[Attempt], Cursor]:
    collected = collect_full(guest, cursor)
    return collected.attempts, collected.cursor
