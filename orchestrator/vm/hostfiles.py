"""Files on the libvirt host: this machine's own files when libvirtd runs here, else the remote
host's over SFTP, on the same kind of SSH connection that reaches its guests (jump.py: the
user's own login to that host, its known_hosts respected, never trust on first use).

What lives there and is ours to read: the sandbox network's dnsmasq query log (egress/dnslog.py)
under /var/lib/libvirt/dnsmasq. The operations are the few a log reader needs: stat, reads at an
offset (each bounded by its caller), writes at an offset, an atomic rename, emptying in place.

SFTP (version 3) gives no inode, so callers tell files apart by content (dnslog's cursor does).
Every failure is a HostFileError naming the host and the file; "no such file" is `stat`'s None.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import subprocess
import zoneinfo
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, tzinfo
from typing import TYPE_CHECKING, BinaryIO, NoReturn, Protocol

from orchestrator.errors import SandboxError
from orchestrator.vm.remoteuri import jump_target, over_ssh

if TYPE_CHECKING:  # paramiko: only where a remote host's files are read
    import paramiko

    from orchestrator.vm.jump import Jump

# Each SFTP request waits at most this long: a host that stops answering must not hang a
# collection (they run under the sandbox's collect lock).
SFTP_TIMEOUT = 20.0
# /etc/localtime is a few KiB; anything much larger is not a zone file.
_ZONE_MAX = 1 << 20
_LOCALTIME = "/etc/localtime"


class HostFileError(SandboxError):
    """A file on the libvirt host could not be read or written."""


class NoHostFiles(HostFileError):
    """This hypervisor URI gives no way to the host's files (a remote host without SSH)."""


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime: float


class Reader(Protocol):
    """An open file: its size when opened, and bounded reads at an offset."""

    size: int

    def read_at(self, offset: int, length: int) -> bytes:
        """At most `length` bytes from `offset` (fewer at the end of the file)."""
        ...


class Writer(Protocol):
    def write_at(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Ran:
    """A program's end on the libvirt host: its exit status and output (bounded, decoded)."""

    status: int
    stdout: str
    stderr: str


# A program run on the host prints at most this much to each stream that is kept.
RUN_OUTPUT_MAX = 1 << 20
RUN_TIMEOUT = 20.0


class HostFiles(Protocol):
    """The files of one libvirt host, and the programs it runs for us (nft). Paths are that
    host's absolute paths."""

    where: str  # "this machine" or "the libvirt host USER@HOST": for messages

    def stat(self, path: str) -> FileStat | None:
        """Size and modification time; None when there is no such file."""
        ...

    def open_read(self, path: str) -> contextlib.AbstractContextManager[Reader]: ...

    def open_write(self, path: str) -> contextlib.AbstractContextManager[Writer]:
        """Create or empty `path` for writing (mode 0600)."""
        ...

    def replace(self, source: str, target: str) -> None:
        """Rename `source` to `target`, atomically replacing it (rename(2))."""
        ...

    def truncate(self, path: str) -> None:
        """Empty `path` in place (same file: whoever has it open goes on writing to it)."""
        ...

    def remove(self, path: str) -> bool:
        """Delete `path`; False when there was none."""
        ...

    def timezone(self) -> tzinfo | None:
        """The zone the host's programs write local times in (None: this machine's)."""
        ...

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        """`argv` on the host as the login user (this process's, locally), with `stdin`; at
        most RUN_TIMEOUT seconds. A program that is not there is a Ran with status 127."""
        ...


class _Base:
    where = ""

    def _access_hint(self, path: str, verb: str) -> str:
        raise NotImplementedError

    def _fail(self, verb: str, path: str, error: BaseException) -> NoReturn:
        """`error` (an OSError, or paramiko's for a connection that broke) as the user's error."""
        if isinstance(error, SandboxError):
            raise error
        code = getattr(error, "errno", None)
        if code in (errno.EACCES, errno.EPERM):
            raise HostFileError(
                f"permission denied {verb} {path} on {self.where}",
                self._access_hint(path, verb),
            ) from None
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if isinstance(error, TimeoutError):
            reason = "no answer in time"
        raise HostFileError(
            f"cannot finish {verb} {path} on {self.where}: {reason}", self._retry_hint()
        ) from None

    def _retry_hint(self) -> str:
        return "try again; if it persists, check the file and its directory"


# ---- this machine ------------------------------------------------------------------------------


@dataclass
class _LocalReader:
    handle: BinaryIO
    size: int
    fail: Callable[[BaseException], NoReturn]

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            self.handle.seek(offset)
            return self.handle.read(max(0, length))
        except OSError as e:
            self.fail(e)


@dataclass
class _LocalWriter:
    handle: BinaryIO
    fail: Callable[[BaseException], NoReturn]

    def write_at(self, offset: int, data: bytes) -> None:
        try:
            self.handle.seek(offset)
            self.handle.write(data)
        except OSError as e:
            self.fail(e)


class LocalFiles(_Base):
    """libvirtd runs on this machine: its files are ours to open (as root)."""

    where = "this machine"

    def _access_hint(self, path: str, verb: str) -> str:
        return f"run sandbox as root: {posixpath.dirname(path)} belongs to libvirt"

    def stat(self, path: str) -> FileStat | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._fail("reading", path, e)
        return FileStat(st.st_size, st.st_mtime)

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[Reader]:
        try:
            handle = open(path, "rb")  # noqa: SIM115  # closed below, errors converted first
        except OSError as e:
            self._fail("reading", path, e)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            yield _LocalReader(handle, size, lambda e: self._fail("reading", path, e))

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[Writer]:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            self._fail("writing", path, e)
        with os.fdopen(fd, "wb") as handle:
            yield _LocalWriter(handle, lambda e: self._fail("writing", path, e))

    def replace(self, source: str, target: str) -> None:
        try:
            os.replace(source, target)
        except OSError as e:
            self._fail("renaming to", target, e)

    def truncate(self, path: str) -> None:
        try:
            os.truncate(path, 0)
        except OSError as e:
            self._fail("emptying", path, e)

    def remove(self, path: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            self._fail("removing", path, e)
        return True

    def timezone(self) -> tzinfo | None:
        return None

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        try:
            proc = subprocess.run(
                list(argv), input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT
            )
        except FileNotFoundError:
            return Ran(127, "", f"{argv[0]}: not found")
        except subprocess.TimeoutExpired:
            raise HostFileError(
                f"{' '.join(argv)} did not finish within {RUN_TIMEOUT:.0f} s on {self.where}",
                "check what holds it up (for nft: another nft or iptables running)",
            ) from None
        return Ran(proc.returncode, proc.stdout[-RUN_OUTPUT_MAX:], proc.stderr[-RUN_OUTPUT_MAX:])


LOCAL = LocalFiles()


# ---- a remote host, over SFTP ------------------------------------------------------------------


# What a broken SFTP session raises besides OSError (imported with paramiko, when used).
def _sftp_errors() -> tuple[type[BaseException], ...]:
    import paramiko

    return (OSError, EOFError, paramiko.SSHException)


@dataclass
class _RemoteReader:
    handle: paramiko.SFTPFile
    size: int
    fail: Callable[[BaseException], NoReturn]

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0:
            return b""
        try:
            # readv asks for every 32 KiB piece at once: one round trip, not one per piece.
            return b"".join(self.handle.readv([(offset, length)]))
        except _sftp_errors() as e:
            self.fail(e)


@dataclass
class _RemoteWriter:
    handle: paramiko.SFTPFile
    fail: Callable[[BaseException], NoReturn]

    def write_at(self, offset: int, data: bytes) -> None:
        try:
            self.handle.seek(offset)
            self.handle.write(data)
        except _sftp_errors() as e:
            self.fail(e)


class RemoteFiles(_Base):
    """The files of a remote libvirt host, over SFTP on `jump`'s connection (which the caller
    owns). The SFTP session is opened on first use and closed with `close`."""

    def __init__(self, jump: Jump, timeout: float = SFTP_TIMEOUT) -> None:
        self._jump = jump
        self._timeout = timeout
        self._sftp: paramiko.SFTPClient | None = None
        self.where = f"the libvirt host {jump.host}"

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None

    def _access_hint(self, path: str, verb: str) -> str:
        host = self._jump.host
        need = "read" if verb == "reading" else "read and write"
        directory = posixpath.dirname(path)
        return (
            f"sandbox logs in to {host.name} as {host.user} (the URI's user, else User in "
            f"~/.ssh/config), who needs {need} access to {directory} and the files in it: "
            f"connect as root (qemu+ssh://root@{host.name}/system), or give {host.user} that "
            "access on the host"
        )

    def _retry_hint(self) -> str:
        return f"check that `{self._jump.host.ssh_command()} true` works, then try again"

    def _client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._jump.sftp(self._timeout)
        return self._sftp

    def _call_failed(self, verb: str, path: str, error: BaseException) -> NoReturn:
        # A broken connection leaves the session unusable: the next call opens a new one.
        if not isinstance(error, OSError) or isinstance(error, TimeoutError):
            self.close()
        self._fail(verb, path, error)

    def stat(self, path: str) -> FileStat | None:
        try:
            attrs = self._client().stat(path)
        except FileNotFoundError:
            return None
        except _sftp_errors() as e:
            self._call_failed("reading", path, e)
        return FileStat(attrs.st_size or 0, float(attrs.st_mtime or 0))

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[Reader]:
        try:
            handle = self._client().open(path, "rb")
            size = handle.stat().st_size or 0
        except _sftp_errors() as e:
            self._call_failed("reading", path, e)
        with handle:
            yield _RemoteReader(handle, size, lambda e: self._call_failed("reading", path, e))

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[Writer]:
        try:
            handle = self._client().open(path, "wb")
            handle.chmod(0o600)
            # Without pipelining each write waits for its answer: one round trip a 32 KiB piece.
            handle.set_pipelined(True)
        except _sftp_errors() as e:
            self._call_failed("writing", path, e)
        try:
            with handle:  # closing waits for the pipelined writes' answers
                yield _RemoteWriter(handle, lambda e: self._call_failed("writing", path, e))
        except _sftp_errors() as e:
            self._call_failed("writing", path, e)

    def replace(self, source: str, target: str) -> None:
        try:
            # posix-rename@openssh.com: plain SFTP rename refuses an existing target.
            self._client().posix_rename(source, target)
        except _sftp_errors() as e:
            self._call_failed("renaming to", target, e)

    def truncate(self, path: str) -> None:
        try:
            self._client().truncate(path, 0)
        except _sftp_errors() as e:
            self._call_failed("emptying", path, e)

    def remove(self, path: str) -> bool:
        try:
            self._client().remove(path)
        except FileNotFoundError:
            return False
        except _sftp_errors() as e:
            self._call_failed("removing", path, e)
        return True

    def timezone(self) -> tzinfo | None:
        """The zone of the host's /etc/localtime (read as a file: SFTP follows its symlink, and
        a copied zone file works too); UTC where it has none, as glibc then does."""
        if self.stat(_LOCALTIME) is None:
            return UTC
        with self.open_read(_LOCALTIME) as reader:
            data = reader.read_at(0, min(reader.size, _ZONE_MAX))
        try:
            return zoneinfo.ZoneInfo.from_file(io.BytesIO(data), key=f"{self._jump.host.name}")
        except (ValueError, OSError):
            raise HostFileError(
                f"{_LOCALTIME} on {self.where} is not a zone file",
                "sandbox needs the host's time zone to read the times its dnsmasq logs; fix "
                f"{_LOCALTIME} there (ln -sf /usr/share/zoneinfo/ZONE {_LOCALTIME})",
            ) from None

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Ran:
        status, out, err = self._jump.run(argv, stdin, RUN_TIMEOUT, RUN_OUTPUT_MAX)
        return Ran(status, out, err)


@contextlib.contextmanager
def on_host(uri: str) -> Iterator[HostFiles]:
    """The files of the host the hypervisor at `uri` runs on, for the block's length: this
    machine's, or over one SSH connection to a remote host (the user's own login to it).
    NoHostFiles for a remote URI that is not SSH (qemu+tcp, qemu+tls)."""
    target = jump_target(uri)
    if target is None:
        yield LOCAL
        return
    if not over_ssh(uri):
        raise NoHostFiles(
            f"{uri} is not an SSH connection: sandbox reads the files of a remote libvirt host "
            f"(its DNS query log) only over SSH to it",
            f"connect with qemu+ssh://USER@{target.host}/system to have them",
        )
    from orchestrator.vm.jump import Jump, jump_host

    host = jump_host(uri)
    assert host is not None
    with Jump(host) as jump:
        files = RemoteFiles(jump)
        try:
            yield files
        finally:
            files.close()
