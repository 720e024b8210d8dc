"""Image recipe, manifest and sources logic; one real build behind the `vm` marker."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator import paths
from orchestrator.errors import ImageError, NotFoundError, UsageError
from orchestrator.vm import images
from orchestrator.vm.images import (
    AptSource,
    ImageManifest,
    ImageRecipe,
    default_image_name,
    host_sources,
    recipe_hash,
)


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    """A copy of the real recipe, free to edit."""
    target = tmp_path / "images"
    shutil.copytree(images.RECIPE_DIR, target, symlinks=True)
    return target


# --- recipe ---------------------------------------------------------------------------------


def test_default_image_name() -> None:
    assert default_image_name() == "default"
    assert default_image_name([]) == "default"
    name = default_image_name(["php-mysql", "php-gd"])
    assert name.startswith("pkgs-") and len(name) == len("pkgs-") + 8
    # Order and duplicates do not matter; the set does.
    assert default_image_name(["php-gd", "php-mysql", "php-gd"]) == name
    assert default_image_name(["php-gd"]) != name


def test_recipe_create_sorts_and_dedups() -> None:
    recipe = ImageRecipe.create(["zip", "curl", "zip", " "])
    assert recipe.extra_packages == ("curl", "zip")
    assert recipe.name == default_image_name(["curl", "zip"])
    assert set(images.BASE_PACKAGES) < set(recipe.packages)
    assert list(recipe.packages) == sorted(recipe.packages)
    assert ImageRecipe.create().name == "default"
    assert ImageRecipe.create(["curl"], name="mine").name == "mine"


@pytest.mark.parametrize("name", ["", "Upper", "-x", "a/b", "a b", "../x"])
def test_recipe_rejects_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        ImageRecipe(name=name)


@pytest.mark.parametrize("package", ["Bad", "a;rm", "x y", "-opt", "a"])
def test_recipe_rejects_bad_packages(package: str) -> None:
    with pytest.raises(UsageError):
        ImageRecipe.create([package])


def test_recipe_hash_is_stable(recipe_dir: Path) -> None:
    recipe = ImageRecipe.create()
    first = recipe_hash(recipe, recipe_dir)
    assert first == recipe_hash(ImageRecipe.create(), recipe_dir)
    # Name and sources are not content: same hash.
    assert first == recipe_hash(ImageRecipe(name="other"), recipe_dir)
    assert first == recipe_hash(ImageRecipe(sources=Path("/x.sources")), recipe_dir)
    # Touching a file without changing it keeps the hash.
    customize = recipe_dir / "customize.sh"
    os.utime(customize, (0, 0))
    assert first == recipe_hash(recipe, recipe_dir)


def test_recipe_hash_changes_with_the_recipe(recipe_dir: Path) -> None:
    recipe = ImageRecipe.create()
    base = recipe_hash(recipe, recipe_dir)
    assert recipe_hash(ImageRecipe.create(["curl"]), recipe_dir) != base
    assert recipe_hash(ImageRecipe(suite="trixie"), recipe_dir) != base

    overlay_file = recipe_dir / "rootfs/etc/fstab"
    original = overlay_file.read_text()
    overlay_file.write_text(original + "# changed\n")
    assert recipe_hash(recipe, recipe_dir) != base
    overlay_file.write_text(original)
    assert recipe_hash(recipe, recipe_dir) == base

    (recipe_dir / "rootfs/etc/new-file").write_text("x")
    assert recipe_hash(recipe, recipe_dir) != base
    (recipe_dir / "rootfs/etc/new-file").unlink()

    customize = recipe_dir / "customize.sh"
    customize.chmod(0o644)
    assert recipe_hash(recipe, recipe_dir) != base
    customize.chmod(0o755)
    assert recipe_hash(recipe, recipe_dir) == base

    # A file renamed with the same content is a different recipe.
    overlay_file.rename(recipe_dir / "rootfs/etc/fstab2")
    assert recipe_hash(recipe, recipe_dir) != base


def test_recipe_hash_without_recipe(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="recipe is missing"):
        recipe_hash(ImageRecipe.create(), tmp_path)


def test_shipped_recipe_holds_the_contract() -> None:
    rootfs = images.RECIPE_DIR / "rootfs"
    cloud = (rootfs / "etc/cloud/cloud.cfg.d/99_sandbox.cfg").read_text()
    assert "datasource_list: [NoCloud]" in cloud and "config: disabled" in cloud
    sshd = (rootfs / "etc/ssh/sshd_config.d/sandbox.conf").read_text()
    assert "PermitRootLogin prohibit-password" in sshd and "PasswordAuthentication no" in sshd
    assert (rootfs / "etc/fstab").read_text().startswith("/dev/vda / ext4")
    assert os.access(images.RECIPE_DIR / "customize.sh", os.X_OK)
    assert images.KERNEL_CMDLINE.startswith("root=/dev/vda rw console=ttyS0")
    # Nothing uses the kernel's audit (the connect() capture is eBPF): no audit hooks at all.
    assert "audit=0" in images.KERNEL_CMDLINE
    assert "auditd" not in images.BASE_PACKAGES
    unit = (rootfs / "etc/systemd/system/sandbox-capture.service").read_text()
    assert "ExecStart=/usr/sbin/sbx-capture load /usr/lib/sandbox/connect.bpf.o" in unit
    assert (
        "enable --quiet sandbox-capture.service" in (images.RECIPE_DIR / "customize.sh").read_text()
    )


@pytest.mark.skipif(not shutil.which("clang"), reason="needs clang (scripts/install.sh)")
def test_the_capture_builds_static_with_its_program(tmp_path: Path) -> None:
    subprocess.run(["sh", str(images.RECIPE_DIR / "capture/build.sh"), str(tmp_path)], check=True)
    program = (tmp_path / "connect.bpf.o").read_bytes()
    assert program[:4] == b"\x7fELF" and b"fexit/tcp_v4_connect" in program
    assert b".BTF" in program  # what libbpf relocates against the guest kernel's BTF
    loader = (tmp_path / "sbx-capture").read_bytes()
    assert loader[:4] == b"\x7fELF"
    # static: no program interpreter, so it runs in any guest whatever the host's libraries
    assert b"/lib64/ld-linux" not in loader
    usage = subprocess.run([str(tmp_path / "sbx-capture")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: sbx-capture load OBJECT" in usage.stderr


# --- manifest -------------------------------------------------------------------------------


def _manifest(**changes: object) -> ImageManifest:
    fields: dict[str, object] = {
        "name": "default",
        "recipe_hash": "ab" * 32,
        "created": "2026-11-23T10:00:00+00:00",
        "suite": "bookworm",
        "kernel_version": "6.1.0-28-cloud-amd64",
        "packages": {"php8.2-cli": "8.2.26-1~deb12u1", "openssh-server": "1:9.2p1-2+deb12u3"},
        "files": {name: f"{i:064x}" for i, name in enumerate(images.IMAGE_FILES)},
        "sizes": {name: 10 + i for i, name in enumerate(images.IMAGE_FILES)},
        "extra_packages": ("curl",),
    }
    fields.update(changes)
    return ImageManifest(**fields)  # type: ignore[arg-type]


def test_manifest_json_round_trip() -> None:
    manifest = _manifest()
    assert ImageManifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"name": "x"}'])
def test_manifest_rejects_garbage(text: str) -> None:
    with pytest.raises(ImageError):
        ImageManifest.from_json(text)


def _fake_image(images_dir: Path, name: str = "default") -> Path:
    directory = images_dir / name
    directory.mkdir(parents=True)
    files, sizes = {}, {}
    for i, filename in enumerate(images.IMAGE_FILES):
        (directory / filename).write_bytes(b"x" * (i + 1))
        files[filename] = images._sha256(directory / filename)
        sizes[filename] = i + 1
    (directory / paths.IMAGE_MANIFEST).write_text(
        _manifest(name=name, files=files, sizes=sizes).to_json()
    )
    return directory


def test_load_list_and_verify(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as missing:
        images.load_image("default", tmp_path)
    assert missing.value.hint and "sandbox image build" in missing.value.hint
    assert images.list_images(tmp_path / "nowhere") == []

    directory = _fake_image(tmp_path)
    _fake_image(tmp_path, "other")
    (tmp_path / ".default.build-x").mkdir()  # leftovers are not images
    image = images.load_image("default", tmp_path)
    assert image.disk == directory / paths.IMAGE_DISK
    assert image.kernel == directory / paths.IMAGE_KERNEL
    assert image.initrd == directory / paths.IMAGE_INITRD
    images.verify_image(image)
    assert [i.name for i in images.list_images(tmp_path)] == ["default", "other"]

    # Same size, other content: only the full check sees it.
    kernel = directory / paths.IMAGE_KERNEL
    kernel.write_bytes(b"y" * kernel.stat().st_size)
    images.load_image("default", tmp_path)
    with pytest.raises(ImageError, match="sha256"):
        images.verify_image(image)
    # Another size: the cheap check sees it.
    (directory / paths.IMAGE_INITRD).write_bytes(b"")
    with pytest.raises(ImageError, match="bytes"):
        images.load_image("default", tmp_path)
    assert [i.name for i in images.list_images(tmp_path)] == ["other"]


# --- sources --------------------------------------------------------------------------------

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_sources_from_deb822(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list.d/debian.sources": f"""\
# a comment
Types: deb deb-src
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates trixie
Components: main contrib
Signed-By: {DEBIAN_KEYRING}

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: {DEBIAN_KEYRING}

Types: deb
URIs: http://mirror.example/debian
Suites: bookworm-backports
Components: main
Enabled: no
Signed-By: {DEBIAN_KEYRING}
""",
            "sources.list.d/vendor.sources": """\
Types: deb
URIs: http://vendor.example/repo
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/vendor.gpg
""",
            "sources.list.d/other.sources.disabled": """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm
Components: main
""",
        },
    )
    selected = host_sources("bookworm", apt)
    assert selected == [
        AptSource(
            uris=("http://mirror.example/debian",),
            suites=("bookworm", "bookworm-updates"),
            components=("main", "contrib"),
            options=(("Signed-By", DEBIAN_KEYRING),),
        ),
        AptSource(
            uris=("http://mirror.example/debian-security",),
            suites=("bookworm-security",),
            components=("main",),
            options=(("Signed-By", DEBIAN_KEYRING),),
        ),
    ]
    text = images.render_sources(selected)
    assert text.startswith("Types: deb\nURIs: http://mirror.example/debian\n")
    assert "deb-src" not in text and "trixie" not in text and "vendor" not in text
    # The rendered text parses back to the same entries.
    assert images.parse_deb822_sources(text) == selected


def test_sources_from_one_line(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        {
            "sources.list": """\
deb http://mirror.example/debian bookworm main # trailing comment
# deb http://mirror.example/debian bookworm-backports main
deb-src http://mirror.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/etc/apt/keyrings/v.asc] http://v.example/linux/debian bookworm stable
deb http://vendor.example/repo nodistro main
deb [arch=amd64] http://mirror.example/debian/ bullseye main
""",
            "sources.list.d/extra.list": (
                f"deb [signed-by={DEBIAN_KEYRING}] http://m2.example/debian bookworm-updates main\n"
            ),
        },
    )
    selected = host_sources("bookworm", apt)
    assert [(e.uris, e.suites) for e in selected] == [
        (("http://mirror.example/debian",), ("bookworm",)),
        (("http://mirror.example/debian-security",), ("bookworm-security",)),
        (("http://m2.example/debian",), ("bookworm-updates",)),
    ]
    assert selected[2].option("signed-by") == DEBIAN_KEYRING


def test_sources_none_on_a_bare_host(tmp_path: Path) -> None:
    assert host_sources("bookworm", tmp_path / "no-apt") == []
    assert host_sources("bookworm", _apt_dir(tmp_path, {})) == []


def test_sources_argument(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, {})
    work = tmp_path / "work"
    work.mkdir()
    # No host sources: mmdebstrap's default, no mirror argument at all.
    assert images._sources_argument(ImageRecipe(), work, apt) == []
    (apt / "sources.list").write_text("deb http://mirror.example/debian bookworm main\n")
    [arg] = images._sources_argument(ImageRecipe(), work, apt)
    assert "URIs: http://mirror.example/debian" in Path(arg).read_text()
    mine = tmp_path / "mine.sources"
    mine.write_text("Types: deb\n")
    assert images._sources_argument(ImageRecipe(sources=mine), work, apt) == [str(mine)]
    with pytest.raises(UsageError):
        images._sources_argument(ImageRecipe(sources=tmp_path / "absent"), work, apt)


def test_mmdebstrap_command_and_errors(tmp_path: Path) -> None:
    recipe = ImageRecipe.create(["curl"])
    cmd = images.mmdebstrap_command(recipe, tmp_path / "rootfs", ["/x.sources"])
    assert cmd[0] == "mmdebstrap"
    assert cmd[-3:] == ["bookworm", str(tmp_path / "rootfs"), "/x.sources"]
    include = next(a for a in cmd if a.startswith("--include="))
    assert include.removeprefix("--include=").split(",") == list(recipe.packages)
    assert "--dpkgopt=path-exclude=/usr/share/man/*" in cmd
    log = "E: Unable to locate package php-nope\nE: other"
    assert images._unknown_package(log) == "php-nope"
    assert images._unknown_package("E: Package 'foo' has no installation candidate") == "foo"
    assert images._unknown_package("all fine") is None


def test_build_refuses_non_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError) as err:
        images.build_image(ImageRecipe(), tmp_path)
    assert err.value.hint and "root" in err.value.hint
    assert [p.name for p in tmp_path.iterdir()] == [".default.lock"]


def test_failed_build_cleans_up_and_keeps_the_old_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in mmdebstrap that fails the way apt does on an unknown package; the real build
    # path runs around it (lock, temp dir, log, cleanup).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mmdebstrap"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package php-nope'\nexit 100\n")
    fake.chmod(0o755)
    for tool in ("mkfs.ext4", "qemu-img"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    images_dir = tmp_path / "images"
    _fake_image(images_dir)  # its recipe hash matches nothing: a rebuild is due

    with pytest.raises(ImageError, match="php-nope"):
        images.build_image(ImageRecipe(), images_dir, apt_dir=tmp_path / "no-apt")
    assert sorted(p.name for p in images_dir.iterdir()) == [
        ".default.build.log",
        ".default.lock",
        "default",
    ]
    assert "php-nope" in (images_dir / ".default.build.log").read_text()
    images.verify_image(images.load_image("default", images_dir))


# --- the real thing -------------------------------------------------------------------------


@pytest.mark.vm
def test_build_image_for_real(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        pytest.skip("needs root and mmdebstrap")
    # A directory of its own: in the user's cache (which the end-to-end tests fill) this would
    # find the image already built and test nothing but the cache.
    images_dir = tmp_path / "images"
    recipe = ImageRecipe.create()
    image = images.build_image(recipe, images_dir)

    manifest = image.manifest
    assert manifest.recipe_hash == recipe_hash(recipe)
    assert manifest.name == "default" and manifest.suite == "bookworm"
    assert manifest.kernel_version.endswith("-cloud-amd64")
    for package in ("openssh-server", "cloud-init", "php8.2-cli", "php-xdebug", "libc6"):
        assert package in manifest.packages
    assert image.disk.read_bytes()[:4] == b"QFI\xfb"  # qcow2 magic
    assert image.kernel.stat().st_size > 1_000_000 and image.initrd.stat().st_size > 1_000_000
    images.verify_image(image)
    assert images.load_image("default", images_dir) == image

    started = time.monotonic()
    again = images.build_image(recipe, images_dir)
    assert time.monotonic() - started < 5
    assert again == image
