#!/bin/sh
# mmdebstrap customize hook: $1 is the root filesystem of the guest image, fully installed.
# Runs on the host, as root; $SANDBOX_RECIPE_DIR is the images/ directory of the source tree.
set -eu
root="$1"

# The overlay: plain cp -R (not -a) so every file is owned by root whoever owns the checkout.
umask 022
cp -R "$SANDBOX_RECIPE_DIR/rootfs/." "$root/"

# No host keys in the image: the host makes one per sandbox and the seed installs it.
rm -f "$root"/etc/ssh/ssh_host_*

# A disposable headless VM: nothing here should cost boot time under TCG.
chroot "$root" systemctl mask --quiet \
    getty.target console-getty.service \
    systemd-journal-flush.service \
    systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
    systemd-tmpfiles-clean.timer phpsessionclean.timer systemd-pstore.service \
    cloud-config.service cloud-final.service \
    cloud-init-local.service
chroot "$root" systemctl enable --quiet systemd-networkd.service
chroot "$root" systemctl enable --quiet sandbox-boot-firewall.service sandbox-seed-policy.service

# The connect() capture (orchestrator/capture/monitor.py), built on the host by images/capture/build.sh
# into $SANDBOX_CAPTURE_BUILD; attached at boot by sandbox-capture.service; its records copied to the
# host as they come by sandbox-capture-stream.service (a virtio-serial port).
install -D -m 0755 "$SANDBOX_CAPTURE_BUILD/sbx-capture" "$root/usr/sbin/sbx-capture"
install -D -m 0644 "$SANDBOX_CAPTURE_BUILD/connect.bpf.o" "$root/usr/lib/sandbox/connect.bpf.o"
chroot "$root" systemctl enable --quiet sandbox-capture.service sandbox-capture-stream.service
chroot "$root" systemctl enable --quiet sandbox-ready.service

# Debian's php-xdebug enables itself for every PHP run. Off here: `sandbox run` loads it for its
# own processes only (PHP_INI_SCAN_DIR), so nothing else in the guest runs with a debugger.
chroot "$root" phpdismod -v ALL -s ALL xdebug
# The same xdebug.so under a name without "xdebug" in it, for the ini `sandbox run` loads
# (orchestrator/run/xdebug.py): composer/xdebug-handler restarts PHP with a copy of every loaded
# ini in which lines matching /^\s*(zend_extension\s*=.*xdebug.*)$/mi are commented out, so
# only a line that does not name xdebug loads it again in the restarted process.
extension_dir=$(chroot "$root" php -n -r 'echo ini_get("extension_dir");')
test -f "$root$extension_dir/xdebug.so"
mkdir -p "$root/usr/lib/sandbox/php"
ln -s "$extension_dir/xdebug.so" "$root/usr/lib/sandbox/php/sandbox-trace.so"

# The unprivileged account for the software under test: no password, no sudo.
chroot "$root" useradd --uid 1000 --user-group --create-home --shell /bin/bash sandbox

# Leftovers of the build that would leak the build host's state into every guest.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
# Empty: every sandbox gets its own machine id at boot (a first boot, where systemd applies its
# presets; Debian's enable what the steps above enabled).
: > "$root"/etc/machine-id
