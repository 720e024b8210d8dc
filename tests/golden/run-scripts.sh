# prepare
set -e
mkdir -p -m 0700 /var/lib/sandbox/runs/20261123-140000-ab12 /var/lib/sandbox/xdebug/20261123-140000-ab12
chown sandbox:sandbox /var/lib/sandbox/runs/20261123-140000-ab12 /var/lib/sandbox/xdebug/20261123-140000-ab12
date +%s.%N
iptables-save -t filter
echo '----- sandbox: end of IPv4 rules -----'
ip6tables-save -t filter
# run as the run user
set -e
cd /var/lib/sandbox/runs/20261123-140000-ab12
tar -x --no-same-owner -f .sandbox-upload.tar
rm -f .sandbox-upload.tar
chown -R sandbox:sandbox /var/lib/sandbox/runs/20261123-140000-ab12
set +e
systemd-run --scope --quiet --collect --slice=sandbox.slice --unit=sandbox-run-20261123-140000-ab12.scope -- setpriv --reuid=1000 --regid=1000 --clear-groups --no-new-privs -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/sandbox USER=sandbox LOGNAME=sandbox LANG=C.UTF-8 PHP_INI_SCAN_DIR=:/etc/sandbox/php 'A=b c' php public/index.php 'it'"'"'s'
# run as root
set -e
cd /var/lib/sandbox/runs/20261123-140000-ab12
set +e
systemd-run --scope --quiet --collect --slice=sandbox.slice --unit=sandbox-run-20261123-140000-ab12.scope -- env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 id
# finish
n=0; if [ -f /sys/fs/cgroup/sandbox.slice/sandbox-run-20261123-140000-ab12.scope/cgroup.procs ]; then n=$(wc -l < /sys/fs/cgroup/sandbox.slice/sandbox-run-20261123-140000-ab12.scope/cgroup.procs); [ $n -eq 0 ] || echo 1 > /sys/fs/cgroup/sandbox.slice/sandbox-run-20261123-140000-ab12.scope/cgroup.kill; fi
echo $n
date +%s.%N
find /var/lib/sandbox/xdebug/20261123-140000-ab12 -maxdepth 1 -type f -printf '%f\n'
# kill
[ ! -f /sys/fs/cgroup/sandbox.slice/sandbox-run-20261123-140000-ab12.scope/cgroup.kill ] || echo 1 > /sys/fs/cgroup/sandbox.slice/sandbox-run-20261123-140000-ab12.scope/cgroup.kill
