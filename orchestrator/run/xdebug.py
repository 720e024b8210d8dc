"""xdebug for `sandbox run`: the guest configuration, each run's environment, the trace parser,
and the join that names the PHP line behind each connection attempt. Pure: no SSH here.

xdebug is loaded only into processes `sandbox run` starts. The image disables Debian's own
xdebug ini (phpdismod); `sandbox up` writes `guest_files()` into a directory nothing else scans,
and each run names it in PHP_INI_SCAN_DIR, which child PHP processes inherit with the rest of the
environment.

Facts this relies on, measured with the image's PHP 8.2 and xdebug 3.2.0:
- XDEBUG_MODE overrides xdebug.mode; XDEBUG_CONFIG's output_dir, client_host and client_port
  take effect at request start, before the trace file is opened (its `log` does not: 3.2.0 opens
  the log before reading XDEBUG_CONFIG). trace_output_name and start_with_request cannot be set
  there: they are in the ini. The empty element of PHP_INI_SCAN_DIR=":/etc/sandbox/php" stands
  for Debian's own conf.d.
- Debian's xdebug 3.2.0 is built without zlib ("Compressed File Support => no"), so it writes
  plain .xt files. use_compression is set to 0 anyway: with zlib, xdebug gzflushes
  (Z_FULL_FLUSH) after every trace line, costly and barely compressing. A plain file is also
  readable up to its last complete line when the run is killed. .xt.gz files are still read.
- Time indices are seconds since the request started (not since the TRACE START line, which is
  written later, after the script was compiled), on a monotonic clock anchored to the wall
  clock at process start. TRACE START/END are UTC whatever TZ says. The footer's last time index
  and TRACE END are taken together, so `TRACE END - index` is the origin to the microsecond; a
  trace without a footer (a killed process) only bounds it: between `TRACE START - first
  call's index` and `TRACE START` (11-59 ms apart on the samples of scripts, under TCG).
- composer/xdebug-handler (Composer, PHPStan, Psalm...) restarts PHP as `php -n -c TMPINI`
  with every loaded ini copied into TMPINI, its zend_extension lines naming xdebug commented
  out (the pattern is quoted at GUEST_EXTENSION); the environment (XDEBUG_MODE,
  XDEBUG_CONFIG) is inherited. Loaded through GUEST_EXTENSION, xdebug comes back in the
  restarted process, under its own pid and trace.
- Objects are printed without identity: every curl handle is `class CurlHandle {  }` (see
  `_Request` for how curl_multi requests are told apart).
- Strings in arguments are quoted with control characters escaped (\\t, \\n, \\001), so a tab
  always separates fields; other bytes are written as they are (not necessarily UTF-8); strings
  are cut at 512 bytes ("'...").

The join. An attempt's time is its connect()'s return (orchestrator/capture/monitor.py), inside the
call that made it, but cut to the millisecond, and xdebug's clock and the capture's differ a little
(about a millisecond at most, measured): in a burst of 100 back-to-back connects
(tests/data/xdebug/burst) three fsockopen() calls fit in a millisecond, and "the innermost call
whose interval contains the time" named the right call for 9 of the 100. Times once came from auditd
(tests/data/xdebug/burst_auditd is kept from then): the kernel's coarse clock at connect() entry,
which lags by up to a tick, and ticks come late under TCG: those stamps were all 0.9-9.6 ms earlier
than the start of the fsockopen() that made them, most of them inside the previous call. See
`attribute` for what is done instead, which holds for both clocks."""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import posixpath
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from functools import cached_property

from orchestrator.capture.records import Attempt, Frame, Verdict, parse_time
from orchestrator.config import Limits
from orchestrator.errors import SandboxError


class XdebugMode(Enum):
    TRACE = "trace"
    DEBUG = "debug"
    PROFILE = "profile"
    DEVELOP = "develop"
    COVERAGE = "coverage"
    OFF = "off"


class TraceError(SandboxError):
    """A file that is not an xdebug computerized trace."""


GUEST_INI_DIR = "/etc/sandbox/php"  # scanned only by `sandbox run` processes (PHP_INI_SCAN_DIR)
GUEST_OUTPUT_ROOT = "/var/lib/sandbox/xdebug"  # one subdirectory per run
# A link to Debian's xdebug.so made by images/customize.sh. Its path must not contain "xdebug"
# (in any case): composer/xdebug-handler comments out /^\s*(zend_extension\s*=.*xdebug.*)$/mi
# in the ini it restarts PHP with.
GUEST_EXTENSION = "/usr/lib/sandbox/php/sandbox-trace.so"
# Added to PHP_INI_SCAN_DIR for coverage runs only: PHP does not scan subdirectories.
COVERAGE_INI_DIR = posixpath.join(GUEST_INI_DIR, "coverage")
COVERAGE_PREPEND = posixpath.join(COVERAGE_INI_DIR, "prepend.php")
DEFAULT_DEBUG_PORT = 9003

# %p: the join needs the pid, and the computerized format has no other place for it; %r: a pid
# may run PHP twice (exec), and each run needs its own file.
_TRACE_NAME = re.compile(r"^trace\.(?P<pid>[0-9]+)\.[0-9a-f]+\.xt(?:\.gz)?\Z")
# Every file a run may leave in its output directory (traces, profiles, coverage dumps): the host
# fetches only names of these shapes, which hold no path separator and no "..". \Z, not $: a
# name with a trailing newline is not a name of ours.
_OUTPUT_NAME = re.compile(
    r"(?:trace\.[0-9]{1,10}\.[0-9a-f]{1,32}\.xt(?:\.gz)?"
    r"|cachegrind\.out\.[0-9]{1,10}\.[0-9a-f]{1,32}(?:\.gz)?"
    r"|coverage\.[0-9]{1,10}\.[0-9a-f]{1,32}\.json)\Z"
)
# How far a compressed trace may inflate, unless the caller gives the configured limit.
MAX_DECOMPRESSED = Limits().decompressed

_INI = """\
; Written by `sandbox up`. Read only by the processes `sandbox run` starts: their
; PHP_INI_SCAN_DIR adds this directory to Debian's, where xdebug is disabled.
; Debian's xdebug.so under another name: tools using composer/xdebug-handler restart PHP
; without every zend_extension line that names xdebug; this one does not, so the restarted
; process is traced too (see images/customize.sh).
zend_extension={extension}
; The sandbox's default mode; every run sets XDEBUG_MODE, which takes precedence.
xdebug.mode={mode}
xdebug.start_with_request=yes
; Every run points XDEBUG_CONFIG's output_dir at a directory of its own under this one.
xdebug.output_dir={output_root}
; Computerized traces (parsed by the host), one file per process, uncompressed (see xdebug.py).
xdebug.trace_format=1
xdebug.trace_options=0
xdebug.trace_output_name=trace.%p.%r
xdebug.collect_return=0
xdebug.collect_assignments=0
xdebug.use_compression=0
xdebug.profiler_output_name=cachegrind.out.%p.%r
; Step debugging goes to the guest's loopback, where a reverse SSH tunnel reaches the IDE.
xdebug.client_host=127.0.0.1
xdebug.client_port={port}
"""

_COVERAGE_INI = """\
; Written by `sandbox up`; scanned only by coverage runs.
auto_prepend_file={prepend}
"""

# Runs before the script, in its global scope: hence a static closure, so that it leaves no
# variable behind. The dump is registered from inside a shutdown function, which puts it after
# the script's own shutdown functions (the ones registered before shutdown began).
_COVERAGE_PREPEND = """\
<?php
// Written by `sandbox up`: code coverage of each process of a `sandbox run --xdebug coverage`,
// dumped as JSON into the run's xdebug output directory when the process ends.
(static function (): void {
    if (!function_exists('xdebug_start_code_coverage')) {
        return;
    }
    xdebug_start_code_coverage(XDEBUG_CC_UNUSED | XDEBUG_CC_DEAD_CODE);
    register_shutdown_function(static function (): void {
        register_shutdown_function(static function (): void {
            $coverage = xdebug_get_code_coverage();
            xdebug_stop_code_coverage();
            unset($coverage[__FILE__]);
            $name = sprintf(
                '%s/coverage.%d.%s.json',
                ini_get('xdebug.output_dir'),
                getmypid(),
                bin2hex(random_bytes(3))
            );
            @file_put_contents($name, json_encode($coverage, JSON_UNESCAPED_SLASHES));
        });
    });
})();
"""


def modes(mode: XdebugMode) -> str:
    """The xdebug.mode value for a sandbox mode. Step debugging and develop also trace: the
    attribution of connection attempts to PHP lines reads the trace, and a user debugging the
    script still wants to know which line phoned home. Profile and coverage stay pure (tracing
    would skew the profile and add nothing to coverage)."""
    if mode in (XdebugMode.DEBUG, XdebugMode.DEVELOP):
        return f"{mode.value},trace"
    return str(mode.value)


def output_dir(run_id: str) -> str:
    return posixpath.join(GUEST_OUTPUT_ROOT, run_id)


def guest_files(mode: XdebugMode) -> dict[str, str]:
    """Guest path -> content, written at `up`. Everything every mode needs is pushed whatever the
    default, so `sandbox run --xdebug X` can pick another mode without another push."""
    ini = _INI.format(
        extension=GUEST_EXTENSION,
        mode=modes(mode),
        output_root=GUEST_OUTPUT_ROOT,
        port=DEFAULT_DEBUG_PORT,
    )
    return {
        posixpath.join(GUEST_INI_DIR, "xdebug.ini"): ini,
        posixpath.join(COVERAGE_INI_DIR, "coverage.ini"): _COVERAGE_INI.format(
            prepend=COVERAGE_PREPEND
        ),
        COVERAGE_PREPEND: _COVERAGE_PREPEND,
    }


def run_env(mode: XdebugMode, run_id: str, *, debug_port: int | None = None) -> dict[str, str]:
    """The environment of one run's processes (inherited by the PHP processes they start).

    OFF does not load xdebug at all: Debian's scan directory alone, as for any other process."""
    if mode is XdebugMode.OFF:
        return {}
    # The empty first element is PHP's compiled-in scan directory (Debian's conf.d).
    scan = ["", GUEST_INI_DIR]
    if mode is XdebugMode.COVERAGE:
        scan.append(COVERAGE_INI_DIR)
    directory = output_dir(run_id)
    # XDEBUG_CONFIG is split on spaces: none of these values may contain one. (It accepts
    # `log` too, but 3.2.0 opens its log before reading it: no file ever appeared.)
    config = [f"output_dir={directory}"]
    if mode is XdebugMode.DEBUG:
        port = DEFAULT_DEBUG_PORT if debug_port is None else debug_port
        config += ["client_host=127.0.0.1", f"client_port={port}"]
    return {
        "PHP_INI_SCAN_DIR": ":".join(scan),
        "XDEBUG_MODE": modes(mode),
        "XDEBUG_CONFIG": " ".join(config),
    }


def is_trace_name(name: str) -> bool:
    return _TRACE_NAME.match(name) is not None


def trace_pid(name: str) -> int | None:
    """The pid a trace file is named after; None for a name that is not a trace's."""
    match = _TRACE_NAME.match(name)
    return int(match.group("pid")) if match else None


def is_output_name(name: str) -> bool:
    """Whether a run's output file may have this name (see _OUTPUT_NAME). Pure."""
    return _OUTPUT_NAME.match(name) is not None


# ---- traces ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One function call in a trace. Times are seconds on the trace's own time index."""

    number: int  # xdebug's function number: unique in the trace, entry and exit share it
    level: int
    function: str  # as xdebug names it: "fsockopen", "Client->send", "Client::fetch", "{main}"
    internal: bool  # a PHP built-in (the only kind that makes system calls)
    file: str  # where the call was made
    line: int
    args: tuple[str, ...]
    entry: float
    exit: float | None  # None: still running when the trace ends
    parent: int | None  # the calling frame's number

    def frame(self, *, with_args: bool) -> Frame:
        if self.function == "{main}":
            return Frame("{main}", "", 0)
        return Frame(
            _short_name(self.function),
            self.file,
            self.line,
            ", ".join(self.args) if with_args else None,
        )


@dataclass(frozen=True)
class Trace:
    """One process's trace: its pid (from the file name) and its calls, in entry order."""

    pid: int
    name: str
    start: float  # guest epoch seconds of time index 0
    start_error: float  # how far `start` may be off, either way (0 when the footer gave it)
    end: float  # the last time index in the file
    complete: bool  # the footer is there: the process ended normally
    calls: tuple[Call, ...]

    def at(self, index: float) -> float:
        """A time index as guest epoch seconds."""
        return self.start + index

    @cached_property
    def _by_number(self) -> dict[int, Call]:
        return {call.number: call for call in self.calls}

    def stack(self, call: Call) -> tuple[Frame, ...]:
        """The call and its callers, innermost first."""
        by_number = self._by_number
        frames = [call.frame(with_args=True)]
        parent = call.parent
        while parent is not None and parent in by_number:
            caller = by_number[parent]
            frames.append(caller.frame(with_args=False))
            parent = caller.parent
        return tuple(frames)


_STAMP = re.compile(r"^TRACE (?:START|END) +\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?)\]$")


def _stamp(line: str) -> float | None:
    """The UTC time of a TRACE START or TRACE END line."""
    match = _STAMP.match(line)
    if match is None:
        return None
    text = match.group(1)
    try:
        moment = datetime.strptime(
            text, "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S"
        )
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC).timestamp()


def _decompress(data: bytes, name: str, limit: int = MAX_DECOMPRESSED) -> bytes:
    if not data.startswith(b"\x1f\x8b"):
        return data
    # A trace of a process that was killed ends without a gzip trailer: keep what inflates.
    inflater = zlib.decompressobj(wbits=47)
    try:
        # Never more than the limit in memory: a few KiB of gzip can inflate to gigabytes.
        text = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise TraceError(
            f"{name}: damaged gzip data ({error})", "fetch the trace again from the guest"
        ) from None
    if len(text) > limit:
        raise TraceError(
            f"{name}: inflates to more than {limit >> 20} MiB: not read",
            "a trace that large is a decompression bomb, or raise limits.decompressed_mib",
        )
    return text


def parse_trace(data: bytes, name: str, *, limit: int = MAX_DECOMPRESSED) -> Trace:
    """Parse a computerized (trace_format=1) trace, complete or cut short (a process still
    writing, or killed: the last line may be incomplete, calls may have no exit)."""
    match = _TRACE_NAME.match(name)
    if match is None:
        raise TraceError(
            f"{name!r} is not named like a sandbox trace (trace.<pid>.<hex>.xt)",
            "traces come from `sandbox run` with --xdebug trace, debug or develop",
        )
    text = _decompress(data, name, limit).decode("utf-8", errors="replace")
    lines = text.split("\n")
    lines.pop()  # after the last newline: empty, or a line cut off while it was written
    opened: float | None = None
    closed: float | None = None
    footer_index: float | None = None
    entries: dict[int, tuple[int, str, bool, str, int, tuple[str, ...], float, int | None]] = {}
    exits: dict[int, float] = {}
    open_calls: list[int] = []  # the stack of calls entered and not yet left, by number
    last = 0.0
    for line in lines:
        if opened is None:
            opened = _stamp(line) if line.startswith("TRACE START") else None
            continue
        if line.startswith("TRACE END"):
            closed = _stamp(line)
            break
        fields = line.split("\t")
        if len(fields) >= 5 and fields[:3] == ["", "", ""]:
            footer_index = _float(fields[3])
            continue
        if len(fields) < 5 or not fields[0].isdigit() or not fields[1].isdigit():
            continue  # a return value or assignment line, or a line cut short
        level, number, kind, index = int(fields[0]), int(fields[1]), fields[2], _float(fields[3])
        if index is None:
            continue
        last = max(last, index)
        if kind == "0" and len(fields) >= 11:
            while open_calls and entries[open_calls[-1]][0] >= level:
                open_calls.pop()  # left without an exit line (an exception unwinding)
            parent = open_calls[-1] if open_calls else None
            argc = int(fields[10]) if fields[10].isdigit() else 0
            entries[number] = (
                level,
                fields[5],
                fields[6] == "0",
                fields[8],
                int(fields[9]) if fields[9].isdigit() else 0,
                tuple(fields[11 : 11 + argc]),
                index,
                parent,
            )
            open_calls.append(number)
        elif kind == "1":
            exits[number] = index
            if open_calls and open_calls[-1] == number:
                open_calls.pop()
    if opened is None:
        raise TraceError(
            f"{name}: no TRACE START line: not an xdebug computerized trace, or empty",
            "xdebug.trace_format must be 1 (sandbox up writes it into the guest's ini)",
        )
    calls = tuple(
        Call(number, level, function, internal, file, line, args, entry, exits.get(number), parent)
        # Numbers are handed out at entry: their order is the order of entry.
        for number, (level, function, internal, file, line, args, entry, parent) in sorted(
            entries.items()
        )
    )
    if closed is not None and footer_index is not None:
        return Trace(
            int(match.group("pid")), name, closed - footer_index, 0.0, footer_index, True, calls
        )
    # The header was written between time index 0 and the first call: the origin lies between
    # TRACE START minus the first call's index and TRACE START itself.
    first = calls[0].entry if calls else 0.0
    return Trace(int(match.group("pid")), name, opened - first / 2, first / 2, last, False, calls)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _short_name(function: str) -> str:
    # "{closure:/var/lib/sandbox/runs/<run>/lib/x.php:48-50}": the frame's file says where.
    if function.startswith("{closure:") and function.endswith("}"):
        place = function[len("{closure:") : -1]
        return "{closure:" + place.rsplit("/", 1)[-1] + "}"
    return function


# ---- the join ----------------------------------------------------------------------------------

# Built-ins that open connections or look names up, with the ones that only look names up
# (their connect is the UDP one to the resolver). A connect from any other built-in (an
# extension's client, say) is still attributed, at a higher cost.
RESOLVER_FUNCTIONS = frozenset(
    {
        "gethostbyname",
        "gethostbynamel",
        "gethostbyaddr",
        "dns_get_record",
        "dns_check_record",
        "checkdnsrr",
        "getmxrr",
        "dns_get_mx",
    }
)
NETWORK_FUNCTIONS = RESOLVER_FUNCTIONS | frozenset(
    {
        "fsockopen",
        "pfsockopen",
        "stream_socket_client",
        "stream_socket_sendto",
        "socket_connect",
        "socket_sendto",
        "socket_send",
        "file_get_contents",
        "file_put_contents",
        "fopen",
        "file",
        "readfile",
        "copy",
        "get_headers",
        "get_meta_tags",
        "parse_ini_file",
        "simplexml_load_file",
        "md5_file",
        "sha1_file",
        "hash_file",
        "getimagesize",
        "exif_read_data",
        "curl_exec",
        "curl_multi_exec",
        "curl_multi_select",
        "ftp_connect",
        "ftp_ssl_connect",
        "mail",
        "mysqli_connect",
        "mysqli_real_connect",
        "mysqli->__construct",
        "mysqli->real_connect",
        "PDO->__construct",
        "pg_connect",
        "pg_pconnect",
        "ldap_bind",
        "ldap_connect",
        "imap_open",
        "SoapClient->__construct",
        "SoapClient->__call",
        "SoapClient->__soapCall",
        "SoapClient->__doRequest",
        "DOMDocument->load",
        "XMLReader::open",
        "XMLReader->open",
        "SplFileObject->__construct",
    }
)

# An attempt's stamp is its connect()'s return (CLOCK_MONOTONIC converted to wall time at the
# collection), inside the call that made it, cut to the millisecond; by xdebug's clock that
# millisecond ended up to 1.05 ms before the call began in the samples of tests/data/xdebug
# (both clocks are the guest's, but xdebug's is anchored once at the process's start on the wall
# clock, and a step or slew since then shows; so may a stamp slightly after the call ended).
# LATE also covers the stamps of tests/data/xdebug/burst_auditd, taken when they came from
# auditd: the kernel's coarse clock at connect() entry, cut to the millisecond, whose tick lag
# TCG stretches: the stamps of 100 back-to-back connects came 0.9-9.6 ms before the fsockopen()
# that made them even started (12.6 ms in another run). Within LATE every lag is taken as
# equally likely.
LATE = 0.025
EARLY = 0.002
_STAMP_WIDTH = 0.001
# Internal calls up to this long are found by their entry time, longer ones (sleeps, callbacks
# inside them) by a sweep.
_SHORT_CALL = 0.05
# Costs of the alignment (see `attribute`). They are what decides; the distance in time only
# breaks ties (it is compared second), because the lag is as likely 8 ms as 1 ms.
_MATCH_NAMED = 0.0  # the call's arguments name the destination (or, for DNS, a name)
_MATCH_UNKNOWN = 1.0  # a network built-in whose arguments do not tell (a curl handle)
_MATCH_OTHER = 1.5  # a network built-in naming other addresses (a redirect could do it)
_MATCH_ANY = 2.0  # any other built-in
_REUSE = 0.6  # another attempt in one call: normal for lookups, but the less likely reading
_MAX_USES = 8  # beyond this many attempts on one call, each further one costs the same
_SKIP = 4.0  # leave the attempt without a stack: costlier than any consistent reading

_URL_HOST = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@]*@)?(\[[^\]]*\]|[^/:?#]*)")
_HOSTNAME = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?\Z")
_URL_PORT = re.compile(
    r"^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/@]*@)?(?:\[[^\]]*\]|[^/:?#]*)(?::([0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "ftps": 990}


@dataclass(frozen=True)
class _Targets:
    addresses: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]
    names: frozenset[str]
    # The ports the arguments name ('host:port', a URL's port or its scheme's, fsockopen's
    # port argument); empty when they name none. One address on two ports is two destinations:
    # a script that calls a host by name on 80 and by address on 443, both one server, must
    # not have the two connects traded (the ordering in time alone cannot tell them apart).
    ports: frozenset[int] = frozenset()


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _string_arg(arg: str) -> str | None:
    """A whole string argument as xdebug writes it ('text'), unquoted; None for anything else
    (a number, an object, a string cut short: 'text'...)."""
    return arg[1:-1] if len(arg) >= 2 and arg[0] == "'" and arg[-1] == "'" else None


# Built-ins that take the port as an argument of its own: (position of the host, of the port).
_PORT_ARGUMENT = {
    "fsockopen": (0, 1),
    "pfsockopen": (0, 1),
    "socket_connect": (1, 2),
    "ftp_connect": (0, 1),
    "ftp_ssl_connect": (0, 1),
}


def _targets(call: Call) -> _Targets:
    """Addresses, host names and ports in a call's string arguments: URLs, 'host',
    'host:port', '[v6]:port'. Only the first string may be a bare host name (fopen's 'r' is
    not one)."""
    addresses = set()
    names = set()
    ports = set()
    strings = [s for s in map(_string_arg, call.args) if s is not None]
    for position, value in enumerate(strings):
        address, name = _host(value, bare=position == 0)
        if address is not None:
            addresses.add(address)
        elif name is not None:
            names.add(name)
        if address is not None or name is not None:
            port = _port(value)
            if port is not None:
                ports.add(port)
    if call.function in _PORT_ARGUMENT:
        host, port_at = _PORT_ARGUMENT[call.function]
        if len(call.args) > port_at and len(call.args) > host:
            number = call.args[port_at]
            # fsockopen("host", 80) names the port; fsockopen("host:80") or a default (-1) not.
            if number.isdigit() and 0 < int(number) < 65536:
                ports.add(int(number))
    return _Targets(frozenset(addresses), frozenset(names), frozenset(ports))


def _port(value: str) -> int | None:
    """The port a URL (its own or its scheme's), 'host:port' or '[v6]:port' names."""
    url = _URL_PORT.match(value)
    if url is not None:
        scheme, explicit = url.group(1).lower(), url.group(2)
        return int(explicit) if explicit else _DEFAULT_PORTS.get(scheme)
    if value.startswith("["):
        _, _, rest = value.partition("]")
        text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        text = value.rsplit(":", 1)[1]
    else:
        return None  # a bare name, or a bare IPv6 address
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def _host(
    value: str, *, bare: bool
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, str | None]:
    """The address or host name a URL, 'host', 'host:port' or '[v6]:port' names; a bare host
    name (no scheme) only if `bare`."""
    url = _URL_HOST.match(value)
    host = url.group(1) if url else value
    address = _ip(host)
    if address is None and ":" in host and not host.startswith("["):
        address = _ip(host.rsplit(":", 1)[0])
    if address is None and host.startswith("[") and "]" in host:
        address = _ip(host[: host.index("]") + 1])
    if address is not None:
        return address, None
    if (url or bare) and _HOSTNAME.match(host.rsplit(":", 1)[0]):
        return None, host.rsplit(":", 1)[0].rstrip(".").lower()
    return None, None


def _match_cost(attempt: Attempt, call: Call, targets: _Targets) -> float:
    if call.function not in NETWORK_FUNCTIONS:
        # Naming the address proves nothing here: curl_init() takes the URL, curl_exec()
        # connects.
        return _MATCH_ANY
    if attempt.verdict is Verdict.DNS:
        if call.function in RESOLVER_FUNCTIONS or targets.names:
            return _MATCH_NAMED
        return _MATCH_OTHER if targets.addresses else _MATCH_UNKNOWN
    destination = _ip(attempt.dst)
    named = (destination is not None and destination in targets.addresses) or bool(
        attempt.dns_name and attempt.dns_name.rstrip(".").lower() in targets.names
    )
    # Port 0: getaddrinfo()'s UDP probe of each address it sorts, which names no port.
    if named and (not targets.ports or not attempt.dport or attempt.dport in targets.ports):
        return _MATCH_NAMED
    if named:
        return _MATCH_OTHER  # the right host on another port: a redirect could do it
    if call.function in RESOLVER_FUNCTIONS:
        return _MATCH_OTHER  # a lookup connects to the resolver, not elsewhere
    return _MATCH_OTHER if targets.addresses and not targets.names else _MATCH_UNKNOWN


# curl's multi interface (Composer, Guzzle, Symfony HttpClient): curl connects inside these
# calls for whichever queued request is due, and its resolver thread asks DNS while they run.
# The place that matters is the request's: where its URL was set, and so where it was queued.
ASYNC_DRIVERS = frozenset({"curl_multi_exec", "curl_multi_select"})
_CURLOPT_URL = "10002"
# curl_setopt_array($handle, [CURLOPT_URL => ...]) as xdebug prints the array.
_URL_IN_ARRAY = re.compile(r"(?:^\[|, )10002 => '((?:[^'\\]|\\.)*)'")
# How many earlier requests a driving call looks back at: a polling loop serves the recent ones.
_MAX_REQUESTS = 512


class _Fit(Enum):
    NO = 0
    MAYBE = 1  # a URL naming a host whose address the attempt does not say (no DNS name on it)
    YES = 2


@dataclass(frozen=True)
class _Request:
    """A curl handle queued with curl_multi_add_handle. xdebug prints every handle as
    `class CurlHandle {  }`, so a request is paired with its URL by order: the URLs set (by
    curl_init, curl_setopt CURLOPT_URL or curl_setopt_array) and not yet queued, oldest first,
    the way Composer, Guzzle and Symfony set up a handle and then queue it."""

    queued: int  # position of curl_multi_add_handle among the index's calls
    origin: int  # position of the call that set its URL (`queued` when none did)
    targets: _Targets
    port: int | None  # from the URL: explicit, or the scheme's

    def fits(self, attempt: Attempt) -> _Fit:
        name = attempt.dns_name.rstrip(".").lower() if attempt.dns_name else None
        if attempt.verdict is Verdict.DNS:
            if not self.targets.names:
                return _Fit.NO  # an address in the URL: curl asks no resolver
            if name is None:
                return _Fit.MAYBE
            return _Fit.YES if name in self.targets.names else _Fit.NO
        if self.port is not None and attempt.dport is not None and attempt.dport != self.port:
            return _Fit.NO
        destination = _ip(attempt.dst)
        if destination is not None and destination in self.targets.addresses:
            return _Fit.YES
        if name is not None:
            return _Fit.YES if name in self.targets.names else _Fit.NO
        return _Fit.MAYBE if self.targets.names else _Fit.NO


def _url_set(call: Call) -> str | None:
    """The URL a call gives a curl handle, if it does."""
    args = call.args
    if call.function == "curl_init" and args:
        text = args[0]
    elif call.function == "curl_setopt" and len(args) >= 3 and args[1] == _CURLOPT_URL:
        text = args[2]
    elif call.function == "curl_setopt_array" and len(args) >= 2:
        match = _URL_IN_ARRAY.search(args[1])
        return match.group(1) if match else None
    else:
        return None
    return _string_arg(text)


def _requests(calls: Sequence[Call]) -> list[_Request]:
    pending: list[tuple[int, str]] = []  # (position, URL) set on handles not queued yet
    last: tuple[int, str] | None = None  # a handle queued again keeps its URL
    found = []
    for position, call in enumerate(calls):
        url = _url_set(call)
        if url is not None:
            pending.append((position, url))
        elif call.function == "curl_exec" and pending:
            pending.pop()  # the easy interface ran the handle set up last
        elif call.function == "curl_multi_add_handle":
            if pending:
                last = pending.pop(0)
            if last is None:
                found.append(_Request(position, position, _Targets(frozenset(), frozenset()), None))
                continue
            origin, url = last
            address, name = _host(url, bare=False)
            port = _URL_PORT.match(url)
            number = None
            if port is not None:
                scheme, explicit = port.group(1).lower(), port.group(2)
                number = int(explicit) if explicit else _DEFAULT_PORTS.get(scheme)
            found.append(
                _Request(
                    position,
                    origin,
                    _Targets(
                        frozenset([address] if address else []), frozenset([name] if name else [])
                    ),
                    number,
                )
            )
    return found


@dataclass(frozen=True)
class _Candidate:
    position: int  # the call's position in the trace's internal calls, in entry order
    cost: float
    distance: float  # seconds from the stamp to the call: the tie-breaker


class _Index:
    """A trace's internal calls, with what the join needs of them, searchable by time."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.calls = [call for call in trace.calls if call.internal]
        self.targets = [_targets(call) for call in self.calls]
        self.entries = [trace.at(call.entry) for call in self.calls]
        self.exits = [
            trace.at(call.exit) if call.exit is not None else float("inf") for call in self.calls
        ]
        durations = [leave - entry for entry, leave in zip(self.entries, self.exits, strict=True)]
        self.short = [p for p, length in enumerate(durations) if length <= _SHORT_CALL]
        self.short_entries = [self.entries[p] for p in self.short]
        self.long = [p for p, length in enumerate(durations) if length > _SHORT_CALL]
        self.requests = _requests(self.calls)
        self.queued = [request.queued for request in self.requests]

    def request(
        self, attempt: Attempt, position: int, used: frozenset[int] | set[int] = frozenset()
    ) -> tuple[int, _Fit] | None:
        """The request (index in `requests`) behind an attempt made while the call at
        `position`, a driving call, ran: of those queued before it that fit the attempt
        (the ones naming its destination, else the ones that may), the first not in `used`,
        else the last."""
        before = bisect.bisect_left(self.queued, position)
        fitting: dict[_Fit, list[int]] = {_Fit.YES: [], _Fit.MAYBE: []}
        for index in range(max(0, before - _MAX_REQUESTS), before):
            fit = self.requests[index].fits(attempt)
            if fit is not _Fit.NO:
                fitting[fit].append(index)
        fit = _Fit.YES if fitting[_Fit.YES] else _Fit.MAYBE
        pool = fitting[fit]
        if not pool:
            return None
        unused = [index for index in pool if index not in used]
        return (unused[0] if unused else pool[-1]), fit

    def candidates(self, stamped: Sequence[tuple[Attempt, float]]) -> list[list[_Candidate]]:
        """Each attempt's candidates; `stamped` in stamp order. Short calls are found by their
        entry; long ones (sleeps, callbacks inside, still running) are swept along."""
        early = EARLY + self.trace.start_error
        late = LATE + self.trace.start_error
        active: list[tuple[float, int]] = []  # (exit, position) of long calls entered so far
        entered = 0
        found = []
        for attempt, stamp in stamped:
            horizon = stamp + _STAMP_WIDTH + late
            while entered < len(self.long) and self.entries[self.long[entered]] <= horizon:
                position = self.long[entered]
                heapq.heappush(active, (self.exits[position], position))
                entered += 1
            while active and active[0][0] < stamp - early:
                heapq.heappop(active)
            first = bisect.bisect_left(self.short_entries, stamp - early - _SHORT_CALL)
            last = bisect.bisect_right(self.short_entries, horizon)
            positions = sorted({*self.short[first:last], *(p for _exit, p in active)})
            mine = []
            # A polling loop makes many driving calls between two queued requests: they all
            # see the same requests (keyed by how many were queued before).
            named: dict[int, bool] = {}
            for position in positions:
                entry, leave = self.entries[position], self.exits[position]
                if leave < stamp - early:
                    continue
                distance = max(0.0, entry - stamp - _STAMP_WIDTH) + max(0.0, stamp - leave)
                call = self.calls[position]
                cost = _match_cost(attempt, call, self.targets[position])
                if call.function in ASYNC_DRIVERS:
                    queued = bisect.bisect_left(self.queued, position)
                    if queued not in named:
                        request = self.request(attempt, position)
                        named[queued] = request is not None and request[1] is _Fit.YES
                    if named[queued]:
                        cost = _MATCH_NAMED
                mine.append(_Candidate(position, cost, distance))
            found.append(mine)
        return found


_State = tuple[int, int]  # (last call used, by position; attempts on it so far)
_Cost = tuple[float, float]  # (cost, distance), compared in that order


def _align(candidates_in_order: Sequence[list[_Candidate]]) -> list[int | None]:
    """The cheapest monotone assignment of attempts (in time order) to calls (in entry order):
    dynamic programming over "the last call used, and by how many attempts". Costs are (cost,
    distance) pairs, compared in that order, so that many small distances never outweigh one
    cost."""
    states: dict[_State, tuple[_Cost, int]] = {(-1, 0): ((0.0, 0.0), -1)}
    steps: list[tuple[int | None, int]] = []  # (position chosen or None, previous step)
    for candidates in candidates_in_order:
        following: dict[_State, tuple[_Cost, int]] = {}
        for (last, uses), ((cost, distance), step) in states.items():
            options: list[tuple[_State, _Cost, int | None]] = [
                ((last, uses), (cost + _SKIP, distance), None)
            ]
            for candidate in candidates:
                if candidate.position < last:
                    continue
                # Each further attempt on one call costs more: of two lookups making two
                # queries each, 2+2 is likelier than 3+1.
                again = uses if candidate.position == last else 0
                total = (cost + candidate.cost + _REUSE * again, distance + candidate.distance)
                state = (candidate.position, min(again + 1, _MAX_USES))
                options.append((state, total, candidate.position))
            for state, total, choice in options:
                if state not in following or total < following[state][0]:
                    steps.append((choice, step))
                    following[state] = (total, len(steps) - 1)
        horizon = min((c.position for c in candidates), default=-1)
        states = _frontier(following, horizon)
    _total, step = min(states.values())
    chosen: list[int | None] = []
    while step >= 0:
        choice, step = steps[step]
        chosen.append(choice)
    chosen.reverse()
    return chosen


def _frontier(
    states: dict[_State, tuple[_Cost, int]], horizon: int
) -> dict[_State, tuple[_Cost, int]]:
    """The states worth keeping. No later attempt can use a call before `horizon`, this
    attempt's first candidate (stamps only grow): all states behind it are equally free, and
    only the cheapest matters. Beyond that, a state is kept only if it is cheaper than every
    state at an earlier call (or at the same call with fewer attempts on it), since those can
    do all it can at no more cost."""

    def rank(state: _State) -> tuple[float, _Cost, int]:
        place = state[0] if state[0] >= horizon else horizon - 0.5
        return (place, states[state][0], state[1])

    kept = {}
    best: _Cost | None = None
    for state in sorted(states, key=rank):
        total = states[state][0]
        if best is None or total < best:
            kept[state] = states[state]
            best = total
    return kept


def _covering(
    spans: dict[int, list[tuple[float, float, int]]], attempt: Attempt
) -> tuple[int, float] | None:
    """(index of the trace accounting for the attempt's process at its time, the attempt's
    stamp), or None when no trace does."""
    if attempt.pid is None or attempt.pid not in spans:
        return None
    stamp = parse_time(attempt.time).timestamp()
    for since, until, index in spans[attempt.pid]:
        if since <= stamp <= until:
            return index, stamp
    return None


def _spans(traces: Sequence[Trace]) -> dict[int, list[tuple[float, float, int]]]:
    """Per pid, the stretch of time each trace accounts for: (from, to, index in traces). A
    trace cut short (the process was killed, or exec'd another program) runs until the same
    pid's next trace starts."""
    by_pid: dict[int, list[int]] = {}
    for index, trace in enumerate(traces):
        by_pid.setdefault(trace.pid, []).append(index)
    spans: dict[int, list[tuple[float, float, int]]] = {}
    for pid, indices in by_pid.items():
        indices.sort(key=lambda i: traces[i].start)
        for position, index in enumerate(indices):
            trace = traces[index]
            margin = trace.start_error
            if trace.complete:
                until = trace.at(trace.end) + LATE + margin
            elif position + 1 < len(indices):
                following = traces[indices[position + 1]]
                until = following.start - following.start_error
            else:
                until = float("inf")
            spans.setdefault(pid, []).append((trace.start - EARLY - margin, until, index))
    return spans


def attribute(attempts: Sequence[Attempt], traces: Sequence[Trace]) -> list[Attempt]:
    """The attempts, in the same order, with `stack` filled where a trace of the attempt's
    process covers its time; the others unchanged.

    Per trace, its attempts (by stamp) are aligned with its built-in calls (by entry) as the
    cheapest monotone assignment: one process does one thing at a time, so later attempts come
    from the same or later calls. A call near the stamp (up to LATE after it, EARLY before) is a
    candidate; it costs less when its arguments name the attempt's destination (or, for a DNS
    query, when it looks a name up), when it is a known network function, and when it is not
    already the previous attempt's; closeness to the stamp only breaks ties. The alignment is
    what gets back-to-back connects to one address right despite the stamps' lag.

    An attempt made inside a curl_multi call (and a resolver query of curl's thread made during
    a call that is no network function) is the request's that curl was serving: of the requests
    queued before that call that fit its destination, the first not yet given an attempt of its
    kind, else the last. Its stack is that of the call that set the request's URL."""
    spans = _spans(traces)
    work: dict[int, list[tuple[int, Attempt, float]]] = {}  # position in traces -> attempts
    for position, attempt in enumerate(attempts):
        covering = _covering(spans, attempt)
        if covering is not None:
            index, stamp = covering
            work.setdefault(index, []).append((position, attempt, stamp))
    result = list(attempts)
    for index, items in work.items():
        calls = _Index(traces[index])
        items.sort(key=lambda item: item[2])
        found = calls.candidates([(attempt, stamp) for _p, attempt, stamp in items])
        prepared = []
        for (position, attempt, stamp), candidates in zip(items, found, strict=True):
            # Equal stamps say nothing of order: order them by the call that names them.
            named = min((c.position for c in candidates if c.cost == _MATCH_NAMED), default=-1)
            prepared.append((stamp, named, position, attempt, candidates))
        prepared.sort(key=lambda item: (item[0], item[1], item[2]))
        chosen = _align([candidates for *_, candidates in prepared])
        # Requests already given an attempt, apart for DNS queries and connects.
        used: dict[bool, set[int]] = {True: set(), False: set()}
        for (_stamp, _named, position, attempt, _c), call in zip(prepared, chosen, strict=True):
            if call is None:
                continue
            made_by = calls.calls[call]
            dns = attempt.verdict is Verdict.DNS
            # curl's resolver thread asks while the script does anything at all (Guzzle
            # reading the error of another request, say): a query made during a call that is
            # no network function of its own is a queued request's, if one names a host.
            if made_by.function in ASYNC_DRIVERS or (
                dns and made_by.function not in NETWORK_FUNCTIONS
            ):
                request = calls.request(attempt, call, used[dns])
                if request is not None:
                    used[dns].add(request[0])
                    made_by = calls.calls[calls.requests[request[0]].origin]
            result[position] = replace(attempt, stack=traces[index].stack(made_by))
    return result


# ---- the requests of `sandbox serve` -----------------------------------------------------------

# PHP's built-in server starts a request (and xdebug a trace, a file of its own: %r) for each
# HTTP request. The prepend names it there: a call whose arguments the trace records.
SERVE_MARKER = "__sandbox_serving_request"
# Root's, outside the upload: the application cannot replace it. Written at each serve, so a
# sandbox made before serve existed serves too.
SERVE_PREPEND_PATH = posixpath.join(GUEST_INI_DIR, "serve-prepend.php")
SERVE_PREPEND = f"""\
<?php
// Written by `sandbox serve`, run at the start of every request (auto_prepend_file, and by the
// router wrapper: PHP's built-in server runs a router without the prepend): the call below puts
// the request's method and URI into this request's xdebug trace, where the host finds them to
// name the request behind each connection attempt. It does nothing else.
if (!function_exists('{SERVE_MARKER}')) {{
    function {SERVE_MARKER}(string $method, string $uri): void {{}}
}}
{SERVE_MARKER}(
    (string) ($_SERVER['REQUEST_METHOD'] ?? ''),
    (string) ($_SERVER['REQUEST_URI'] ?? ''),
);
"""
SERVE_ROUTER = ".sandbox-serve-router.php"


def serve_router(router: str) -> str:
    """The router `sandbox serve` gives PHP's built-in server in place of the application's
    (`router`, relative to the run's directory, where this file is written): the prepend, then
    the application's router, whose return value (false: serve the file as it is) passes on."""
    return (
        "<?php\n"
        "// Written by `sandbox serve`: names the request, then runs the application's router.\n"
        f"require {_php_string(SERVE_PREPEND_PATH)};\n"
        f"return require __DIR__ . {_php_string('/' + router)};\n"
    )


def _php_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_REQUEST_TEXT_MAX = 300


def _unquote(arg: str) -> str:
    # A string cut short keeps what was written of it, marked as cut.
    whole = _string_arg(arg)
    if whole is not None:
        return whole
    if arg.startswith("'") and arg.endswith("'..."):
        return arg[1:-4] + "..."
    return arg


def request_of(trace: Trace) -> str | None:
    """'METHOD URI' of the HTTP request the trace's process served, when the serve prepend named
    it (the first marker call: an application calling it again does not rename its request)."""
    for call in trace.calls:
        if call.function == SERVE_MARKER and not call.internal and len(call.args) >= 2:
            text = f"{_unquote(call.args[0])} {_unquote(call.args[1])}"
            return text[:_REQUEST_TEXT_MAX]
    return None


def name_requests(attempts: Sequence[Attempt], traces: Sequence[Trace]) -> list[Attempt]:
    """The attempts, in the same order, with `request` set where the trace covering the
    attempt's process and time is one request of `sandbox serve`."""
    spans = _spans(traces)
    requests = [request_of(trace) for trace in traces]
    result = list(attempts)
    for position, attempt in enumerate(attempts):
        covering = None if attempt.request is not None else _covering(spans, attempt)
        if covering is not None and requests[covering[0]] is not None:
            result[position] = replace(attempt, request=requests[covering[0]])
    return result
