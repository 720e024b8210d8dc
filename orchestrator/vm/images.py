"""The guest base image: built from Debian packages with mmdebstrap, cached, verified, found.

An image is a directory under `Dirs.images` named after the image: the root filesystem as a qcow2
disk (raw ext4, no partition table, the kernel gets `root=/dev/vda`), the kernel and initrd beside
it for direct kernel boot, and a manifest that records what went in and each file's sha256.

The recipe is the directory `images/` at the top of the source tree (`customize.sh`, run as the
mmdebstrap customize hook, and `rootfs/`, copied over the installed tree), together with
BASE_PACKAGES, the extra packages and the suite. It is found by paths.project_dir: inside the
package when installed from a wheel (setup.py bundles it), else in the checkout beside the package
(an editable install); either way the recipe and the code that hashes it are the same revision.
A build is skipped when the recipe hash matches the manifest's.

What the guest relies on (see images/rootfs/ and customize.sh):
- cloud-init runs one stage only, `cloud-init init` (cloud-init.service, NoCloud found on the
  `cidata` seed as NoCloudNet), with write_files, set_hostname, update_hostname,
  update_etc_hosts and ssh; cloud-init-local, cloud-config and cloud-final are masked (the local
  stage cost ~5 s of TCG time for nothing). So `cloud-init status` stays "running" forever: do
  not wait on `cloud-init status --wait`; wait for SSH. No default user (`users: []`), so the
  seed's ssh_authorized_keys go to root only.
- sshd has no host key until cloud-init writes the seed's ed25519 key (ssh.service is ordered
  after cloud-init.service): booting without a seed gives no sshd.
- systemd-networkd does DHCPv4 (client id = MAC) and, where the sandbox network offers it, RA +
  DHCPv6 (DUID-LL from the MAC, EUI-64 link-local) on en*/eth*: the network keeps an address for
  each MAC and DUID, and the host-side filter lets the guest send from those only.
- sandbox-capture.service attaches the connection capture at boot, after the boot firewall and
  before the network (images/capture/, built on the host with clang and cc before mmdebstrap
  runs): `sbx-capture check|drain|load|unload` in the guest.
- sandbox-seed-policy.service loads the egress policy a cold boot's seed carries, before sshd
  starts, and says so in /run/sandbox/seed-policy: `up` then reads the rules back instead of
  loading them (orchestrator/egress/guestfw.py `apply`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import paths
from orchestrator.errors import ImageError, NotFoundError, UsageError
from orchestrator.files import file_lock
from orchestrator.waits import Deadline

RECIPE_DIR = paths.project_dir("images")

# Bump when the build steps in this module change what ends up in an image: the recipe hash then
# changes and cached images are rebuilt.
BUILD_VERSION = "1"

BASE_PACKAGES: tuple[str, ...] = (
    "ca-certificates",
    "cloud-init",
    "conntrack",
    "iproute2",
    "iptables",
    "kmod",
    "linux-image-cloud-amd64",
    "lsof",
    "netbase",
    "openssh-server",
    "php-cli",
    "php-curl",
    "php-xdebug",
    "procps",
    "systemd-sysv",
    "udev",
)

# `quiet` and `systemd.show_status=0` keep the serial console (slow under TCG) almost silent.
# audit=0: nothing in the guest uses the kernel's audit (the connection capture is eBPF); with it
# on, every syscall of every task would pass audit's entry and exit hooks.
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 audit=0"

DEFAULT_SUITE = "bookworm"
DEFAULT_NAME = "default"

# Documentation nobody reads in a disposable VM; copyright files stay (they are small).
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)

# Free space in the guest beyond the installed tree, for whatever the software under test writes.
HEADROOM_BYTES = 1024 * 1024 * 1024
SIZE_ROUNDING = 64 * 1024 * 1024

BUILD_TIMEOUT = 30 * 60.0
LOCK_TIMEOUT = 40 * 60.0
STEP_TIMEOUT = 10 * 60.0

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_SUITE_RE = re.compile(r"[a-z0-9][a-z0-9.-]*")
_UNKNOWN_PACKAGE_RES = (
    re.compile(r"Unable to locate package (\S+)"),
    re.compile(r"Package '?([^' ]+)'? has no installation candidate"),
    re.compile(r"Couldn't find any package by (?:glob|regex) '([^']+)'"),
)

_BUILD_HINT = (
    "install the tools with `apt-get install mmdebstrap e2fsprogs qemu-utils clang gcc "
    "libbpf-dev libelf-dev zlib1g-dev` (or run scripts/install.sh)"
)
_MISSING_HINT = "run `sandbox image build` to build it"
_REBUILD_HINT = "rebuild it with `sandbox image build --force`"


# --- recipe ---------------------------------------------------------------------------------


def _normalize_packages(packages: Iterable[str]) -> tuple[str, ...]:
    result = tuple(sorted({p.strip() for p in packages if p.strip()}))
    for package in result:
        if not _PACKAGE_RE.fullmatch(package):
            raise UsageError(
                f"{package!r} is not a Debian package name",
                "package names use lowercase letters, digits and + - . only",
            )
    return result


def default_image_name(extra_packages: Iterable[str] = ()) -> str:
    """`default` with no extra packages, else a name derived from the (sorted) package set."""
    packages = _normalize_packages(extra_packages)
    if not packages:
        return DEFAULT_NAME
    digest = hashlib.sha256("\n".join(packages).encode()).hexdigest()
    return f"pkgs-{digest[:8]}"


@dataclass(frozen=True)
class ImageRecipe:
    name: str = DEFAULT_NAME
    extra_packages: tuple[str, ...] = ()
    suite: str = DEFAULT_SUITE
    # A sources file (one-line or deb822) for mmdebstrap; None = the host's apt sources for the
    # suite, or mmdebstrap's own default when the host has none.
    sources: Path | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise UsageError(
                f"{self.name!r} is not a valid image name",
                "use lowercase letters, digits and _ . - (starting with a letter or digit)",
            )
        if not _SUITE_RE.fullmatch(self.suite):
            raise UsageError(f"{self.suite!r} is not a Debian suite name", "e.g. bookworm")
        object.__setattr__(self, "extra_packages", _normalize_packages(self.extra_packages))

    @classmethod
    def create(
        cls,
        extra_packages: Iterable[str] = (),
        *,
        name: str | None = None,
        suite: str = DEFAULT_SUITE,
        sources: Path | None = None,
    ) -> ImageRecipe:
        extras = _normalize_packages(extra_packages)
        return cls(
            name=name or default_image_name(extras),
            extra_packages=extras,
            suite=suite,
            sources=sources,
        )

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(sorted(set(BASE_PACKAGES) | set(self.extra_packages)))


def _recipe_files(recipe_dir: Path) -> list[Path]:
    if not (recipe_dir / "customize.sh").is_file():
        raise ImageError(
            f"the image recipe is missing: no customize.sh in {recipe_dir}",
            "reinstall sandbox from its source checkout (`pip install .` or `pip install -e .`)",
        )
    return sorted(
        (p for p in recipe_dir.rglob("*") if p.is_file() or p.is_symlink()),
        key=lambda p: p.relative_to(recipe_dir).as_posix(),
    )


def recipe_hash(recipe: ImageRecipe, recipe_dir: Path = RECIPE_DIR) -> str:
    """sha256 over everything that decides an image's content.

    The recipe files (name, executable bit, content), the package set, the suite, the dpkg
    options and BUILD_VERSION. Not the sources: a different mirror of the same suite is the same
    image.
    """
    h = hashlib.sha256()

    def put(tag: str, data: bytes) -> None:
        h.update(f"{tag}\0{len(data)}\0".encode())
        h.update(data)

    put("build", BUILD_VERSION.encode())
    put("suite", recipe.suite.encode())
    put("packages", "\n".join(recipe.packages).encode())
    put("dpkg", "\n".join(DPKG_OPTIONS).encode())
    for path in _recipe_files(recipe_dir):
        rel = path.relative_to(recipe_dir).as_posix()
        if path.is_symlink():
            put(f"link:{rel}", os.readlink(path).encode())
        else:
            executable = "x" if os.access(path, os.X_OK) else "-"
            put(f"file:{executable}:{rel}", path.read_bytes())
    return h.hexdigest()


# --- apt sources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    """One apt source entry, in deb822 terms (a one-line entry maps onto the same fields)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    types: tuple[str, ...] = ("deb",)
    # Other fields (Signed-By, Architectures, ...), values verbatim (multi-line values keep
    # their newlines).
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str) -> str | None:
        for name, value in self.options:
            if name.lower() == key.lower():
                return value
        return None


_ONE_LINE_OPTION_NAMES = {
    "arch": "Architectures",
    "signed-by": "Signed-By",
    "trusted": "Trusted",
    "lang": "Languages",
    "target": "Targets",
    "pdiffs": "PDiffs",
    "by-hash": "By-Hash",
}


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Parse sources.list (one-line style); comments and malformed lines are skipped."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options: list[tuple[str, str]] = []
        bracket = re.match(r"(\S+)\s+\[([^\]]*)\]\s*(.*)", line)
        if bracket:
            kind, opts, rest = bracket.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options.append((_ONE_LINE_OPTION_NAMES.get(key, key), value.replace(",", " ")))
            words = [kind, *rest.split()]
        else:
            words = line.split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        entries.append(
            AptSource(
                types=(words[0],),
                uris=(words[1],),
                suites=(words[2],),
                components=tuple(words[3:]),
                options=tuple(options),
            )
        )
    return entries


def _deb822_paragraphs(text: str) -> Iterator[list[tuple[str, str]]]:
    fields: list[tuple[str, str]] = []
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields = []
        elif raw[0] in " \t":
            if fields:
                key, value = fields[-1]
                fields[-1] = (key, f"{value}\n{raw.strip()}")
        elif ":" in raw:
            key, _, value = raw.partition(":")
            fields.append((key.strip(), value.strip()))
    if fields:
        yield fields


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse a .sources file; disabled (`Enabled: no`) and incomplete stanzas are skipped."""
    entries = []
    for fields in _deb822_paragraphs(text):
        values = {key.lower(): value for key, value in fields}
        if values.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        types, uris, suites = (
            tuple(values.get(k, "").split()) for k in ("types", "uris", "suites")
        )
        if not (types and uris and suites):
            continue
        core = {"types", "uris", "suites", "components", "enabled"}
        entries.append(
            AptSource(
                types=types,
                uris=uris,
                suites=suites,
                components=tuple(values.get("components", "").split()),
                options=tuple((k, v) for k, v in fields if k.lower() not in core),
            )
        )
    return entries


def _is_debian_archive(entry: AptSource) -> bool:
    # Without naming any mirror: Debian's archives are signed by debian-archive-keyring, and
    # their paths end in /debian or /debian-security. A third-party repository for the same suite
    # (its own key) is left out.
    signed_by = entry.option("Signed-By")
    if signed_by is not None:
        return "debian-archive" in signed_by
    return all(
        uri.rstrip("/").rsplit("/", 1)[-1] in ("debian", "debian-security") for uri in entry.uris
    )


def select_sources(entries: Iterable[AptSource], suite: str) -> list[AptSource]:
    """The binary Debian entries for `suite` and its -updates/-security companions."""
    selected = []
    for entry in entries:
        if "deb" not in entry.types or not _is_debian_archive(entry):
            continue
        suites = tuple(
            s for s in entry.suites if s == suite or s.startswith((f"{suite}-", f"{suite}/"))
        )
        if suites:
            selected.append(
                AptSource(
                    types=("deb",),
                    uris=entry.uris,
                    suites=suites,
                    components=entry.components,
                    options=entry.options,
                )
            )
    return selected


def host_sources(suite: str, apt_dir: Path = Path("/etc/apt")) -> list[AptSource]:
    """The enabled Debian entries for `suite` in an apt configuration directory."""
    entries: list[AptSource] = []
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.iterdir())
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.name == "sources.list" or path.suffix == ".list":
            entries += parse_one_line_sources(text)
        elif path.suffix == ".sources":
            entries += parse_deb822_sources(text)
    return select_sources(entries, suite)


def render_sources(entries: Iterable[AptSource]) -> str:
    """deb822 text, which mmdebstrap accepts as a sources file."""
    stanzas = []
    for entry in entries:
        lines = [
            f"Types: {' '.join(entry.types)}",
            f"URIs: {' '.join(entry.uris)}",
            f"Suites: {' '.join(entry.suites)}",
        ]
        if entry.components:
            lines.append(f"Components: {' '.join(entry.components)}")
        for key, value in entry.options:
            first, *rest = value.split("\n")
            lines.append(f"{key}: {first}")
            lines += [f" {line}" if line else " ." for line in rest]
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)


# --- manifest and images --------------------------------------------------------------------


IMAGE_FILES = (paths.IMAGE_DISK, paths.IMAGE_KERNEL, paths.IMAGE_INITRD)


@dataclass(frozen=True)
class ImageManifest:
    name: str
    recipe_hash: str
    created: str
    suite: str
    kernel_version: str
    packages: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    extra_packages: tuple[str, ...] = ()

    def to_json(self) -> str:
        data = {
            "name": self.name,
            "recipe_hash": self.recipe_hash,
            "created": self.created,
            "suite": self.suite,
            "kernel_version": self.kernel_version,
            "extra_packages": list(self.extra_packages),
            "files": dict(sorted(self.files.items())),
            "sizes": dict(sorted(self.sizes.items())),
            "packages": dict(sorted(self.packages.items())),
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ImageManifest:
        try:
            data: Any = json.loads(text)
            return cls(
                name=str(data["name"]),
                recipe_hash=str(data["recipe_hash"]),
                created=str(data["created"]),
                suite=str(data["suite"]),
                kernel_version=str(data["kernel_version"]),
                packages={str(k): str(v) for k, v in data["packages"].items()},
                files={str(k): str(v) for k, v in data["files"].items()},
                sizes={str(k): int(v) for k, v in data["sizes"].items()},
                extra_packages=tuple(str(p) for p in data["extra_packages"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImageError(f"unreadable image manifest: {exc}", _REBUILD_HINT) from exc


@dataclass(frozen=True)
class Image:
    name: str
    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    manifest: ImageManifest

    @classmethod
    def at(cls, directory: Path, manifest: ImageManifest) -> Image:
        return cls(
            name=manifest.name,
            directory=directory,
            disk=directory / paths.IMAGE_DISK,
            kernel=directory / paths.IMAGE_KERNEL,
            initrd=directory / paths.IMAGE_INITRD,
            manifest=manifest,
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def load_image(name: str, images_dir: Path) -> Image:
    """The image `name`, after a cheap check (every file there, at its recorded size)."""
    directory = images_dir / name
    manifest_path = directory / paths.IMAGE_MANIFEST
    if not manifest_path.is_file():
        raise NotFoundError(f"no image named {name!r} in {images_dir}", _MISSING_HINT)
    manifest = ImageManifest.from_json(manifest_path.read_text())
    if manifest.name != name:
        raise ImageError(
            f"image directory {directory} holds a manifest for {manifest.name!r}", _REBUILD_HINT
        )
    for filename in IMAGE_FILES:
        path = directory / filename
        if filename not in manifest.files or filename not in manifest.sizes:
            raise ImageError(f"image {name!r}: {filename} is not in its manifest", _REBUILD_HINT)
        if not path.is_file():
            raise ImageError(f"image {name!r}: {path} is missing", _REBUILD_HINT)
        size = path.stat().st_size
        if size != manifest.sizes[filename]:
            raise ImageError(
                f"image {name!r}: {filename} is {size} bytes, the manifest says "
                f"{manifest.sizes[filename]}",
                _REBUILD_HINT,
            )
    return Image.at(directory, manifest)


def verify_image(image: Image) -> None:
    """Compare every file's sha256 with the manifest (reads the whole disk: seconds)."""
    for filename in IMAGE_FILES:
        path = image.directory / filename
        if not path.is_file():
            raise ImageError(f"image {image.name!r}: {path} is missing", _REBUILD_HINT)
        actual = _sha256(path)
        if actual != image.manifest.files.get(filename):
            raise ImageError(
                f"image {image.name!r}: {filename} has sha256 {actual}, the manifest says "
                f"{image.manifest.files.get(filename)}",
                _REBUILD_HINT,
            )


def list_images(images_dir: Path) -> list[Image]:
    """The images that load (build leftovers and broken images are left out), by name."""
    if not images_dir.is_dir():
        return []
    images = []
    for directory in sorted(images_dir.iterdir()):
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        with contextlib.suppress(NotFoundError, ImageError):
            images.append(load_image(directory.name, images_dir))
    return images


# --- build ----------------------------------------------------------------------------------


def _build_lock(images_dir: Path, name: str) -> contextlib.AbstractContextManager[None]:
    lock_path = images_dir / paths.IMAGE_BUILD_LOCK.format(name=name)
    return file_lock(
        lock_path,
        f"another build of image {name!r} to finish",
        timeout=LOCK_TIMEOUT,
        hint=f"if no build is running, remove {lock_path}",
    )


def _run(cmd: list[str], what: str, timeout: float) -> str:
    """Run a build step and return its standard output; its error output goes into the error."""
    deadline = Deadline(timeout, what, "the machine may be overloaded; try again")
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=deadline.remaining(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise deadline.error() from exc
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _check_build_host() -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "building an image needs root (mmdebstrap installs packages into a chroot)",
            "run it as root, e.g. `sudo sandbox image build`",
        )
    tools = ("mmdebstrap", "mkfs.ext4", "qemu-img", "clang", "cc")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise ImageError(f"missing build tools: {', '.join(missing)}", _BUILD_HINT)


def _sources_argument(recipe: ImageRecipe, workdir: Path, apt_dir: Path) -> list[str]:
    if recipe.sources is not None:
        if not recipe.sources.is_file():
            raise UsageError(
                f"sources file {recipe.sources} does not exist",
                "name an apt sources file (one-line or deb822 format)",
            )
        return [str(recipe.sources.resolve())]
    entries = host_sources(recipe.suite, apt_dir)
    if not entries:
        return []  # mmdebstrap's own default archive for the suite
    sources_file = workdir / "sources"
    sources_file.write_text(render_sources(entries))
    return [str(sources_file)]


def mmdebstrap_command(recipe: ImageRecipe, rootfs: Path, sources_args: list[str]) -> list[str]:
    """The mmdebstrap call; customize.sh finds the recipe through $SANDBOX_RECIPE_DIR."""
    return [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
        # Run under sh with the recipe dir from the environment: paths may contain spaces.
        '--customize-hook=sh "$SANDBOX_RECIPE_DIR/customize.sh" "$1"',
        recipe.suite,
        str(rootfs),
        *sources_args,
    ]


def _unknown_package(log_text: str) -> str | None:
    for pattern in _UNKNOWN_PACKAGE_RES:
        match = pattern.search(log_text)
        if match:
            return match.group(1)
    return None


def _one(pattern: str, directory: Path) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise ImageError(
            f"expected exactly one {pattern} in {directory}, found {len(found)}",
            "the recipe must install exactly one kernel (linux-image-cloud-amd64)",
        )
    return found[0]


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_blocks * 512
    return total


def _installed_packages(rootfs: Path) -> dict[str, str]:
    out = _run(
        [
            "dpkg-query",
            f"--admindir={rootfs / 'var/lib/dpkg'}",
            "--show",
            "--showformat=${Package}\t${Version}\t${db:Status-Status}\n",
        ],
        "listing the image's packages",
        STEP_TIMEOUT,
    )
    packages = {}
    for line in out.splitlines():
        name, version, status = line.split("\t")
        if status == "installed":
            packages[name] = version
    return packages


def _build(
    recipe: ImageRecipe,
    digest: str,
    workdir: Path,
    recipe_dir: Path,
    apt_dir: Path,
    progress: Callable[[str], None],
) -> ImageManifest:
    rootfs = workdir / "rootfs"
    log = workdir / "mmdebstrap.log"
    sources_args = _sources_argument(recipe, workdir, apt_dir)
    capture = workdir / "capture"
    capture.mkdir()
    progress("building the connect() capture (eBPF)")
    _run(
        ["sh", str(recipe_dir / "capture" / "build.sh"), str(capture)],
        "the capture build",
        STEP_TIMEOUT,
    )
    progress(f"installing {len(recipe.packages)} packages with mmdebstrap ({recipe.suite})")
    cmd = mmdebstrap_command(recipe, rootfs, sources_args)
    deadline = Deadline(BUILD_TIMEOUT, "mmdebstrap", "check the package sources and retry")
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=deadline.remaining(),
            check=False,
            env={
                **os.environ,
                "SANDBOX_RECIPE_DIR": str(recipe_dir),
                "SANDBOX_CAPTURE_BUILD": str(capture),
            },
        )
    except subprocess.TimeoutExpired as exc:
        raise deadline.error() from exc
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        unknown = _unknown_package(proc.stdout)
        if unknown:
            raise ImageError(
                f"package {unknown!r} is not available in {recipe.suite}",
                "check the name with `apt-cache policy NAME` and drop or fix it",
            )
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ImageError(
            f"mmdebstrap failed (exit {proc.returncode}):\n{tail}",
            "check the package sources (or pass another sources file) and retry",
        )

    progress("extracting kernel and initrd")
    boot = rootfs / "boot"
    kernel = _one("vmlinuz-*", boot)
    initrd = _one("initrd.img-*", boot)
    kernel_version = kernel.name.removeprefix("vmlinuz-")
    shutil.copyfile(kernel, workdir / paths.IMAGE_KERNEL)
    shutil.copyfile(initrd, workdir / paths.IMAGE_INITRD)
    # The guest boots the copy beside the disk; a second copy inside the disk is dead weight.
    initrd.unlink()
    packages = _installed_packages(rootfs)

    size = _tree_size(rootfs) + HEADROOM_BYTES
    size = -(-size // SIZE_ROUNDING) * SIZE_ROUNDING
    raw = workdir / "root.raw"
    progress(f"making a {size / 2**30:.2f} GiB ext4 file system")
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "sandbox-root",
            "-d",
            str(rootfs),
            # Initialise everything now: lazy init would make every guest write its inode tables
            # into its overlay in the background.
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(raw),
            f"{size // 1024}k",
        ],
        "mkfs.ext4",
        STEP_TIMEOUT,
    )
    shutil.rmtree(rootfs)
    progress("converting to qcow2")
    _run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(workdir / "base.qcow2")],
        "qemu-img convert",
        STEP_TIMEOUT,
    )
    raw.unlink()
    os.replace(workdir / "base.qcow2", workdir / paths.IMAGE_DISK)

    progress("hashing the image files")
    files = {name: _sha256(workdir / name) for name in IMAGE_FILES}
    sizes = {name: (workdir / name).stat().st_size for name in IMAGE_FILES}
    return ImageManifest(
        name=recipe.name,
        recipe_hash=digest,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        suite=recipe.suite,
        kernel_version=kernel_version,
        packages=packages,
        files=files,
        sizes=sizes,
        extra_packages=recipe.extra_packages,
    )


def build_image(
    recipe: ImageRecipe,
    images_dir: Path,
    *,
    force: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    recipe_dir: Path = RECIPE_DIR,
    apt_dir: Path = Path("/etc/apt"),
) -> Image:
    """The image for `recipe`: the cached one when its recipe hash matches, else a fresh build.

    Builds in a temporary directory beside the target and swaps it in with renames, so a failed
    build leaves the previous image (if any) untouched. Guests whose overlays are backed by the
    previous disk must be destroyed first: their backing file is replaced.
    """
    digest = recipe_hash(recipe, recipe_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(images_dir, recipe.name):
        if not force:
            with contextlib.suppress(NotFoundError, ImageError):
                cached = load_image(recipe.name, images_dir)
                if cached.manifest.recipe_hash == digest:
                    progress(f"image {recipe.name!r} is up to date")
                    return cached
        _check_build_host()
        workdir = Path(
            tempfile.mkdtemp(
                prefix=paths.IMAGE_BUILD_DIR_PREFIX.format(name=recipe.name), dir=images_dir
            )
        )
        try:
            manifest = _build(recipe, digest, workdir, recipe_dir, apt_dir, progress)
            for leftover in ("sources", "mmdebstrap.log"):
                (workdir / leftover).unlink(missing_ok=True)
            manifest_tmp = workdir / f"{paths.IMAGE_MANIFEST}.tmp"
            with manifest_tmp.open("w") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(manifest_tmp, workdir / paths.IMAGE_MANIFEST)
            os.chmod(workdir, 0o755)
            _swap_in(workdir, images_dir / recipe.name)
        except BaseException:
            _keep_log(workdir, images_dir / paths.IMAGE_BUILD_LOG.format(name=recipe.name))
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        progress(f"image {recipe.name!r} built")
        return load_image(recipe.name, images_dir)


def _keep_log(workdir: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        os.replace(workdir / "mmdebstrap.log", target)


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = new.with_name(new.name + ".old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
