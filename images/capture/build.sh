#!/bin/sh
# Builds the connect() capture for the guest into $1: connect.bpf.o (eBPF, relocated against the
# guest kernel's own BTF when loaded, so no kernel headers) and sbx-capture (static: it runs in
# any guest whatever the host's libraries). Needs clang, cc, libbpf-dev, libelf-dev, zlib1g-dev.
set -eu
here=$(dirname "$0")
out="$1"
multiarch=$(cc -print-multiarch)
clang -O2 -g -target bpf -mcpu=v3 -Wall -Werror -I"/usr/include/$multiarch" \
    -c "$here/connect.bpf.c" -o "$out/connect.bpf.o"
cc -O2 -Wall -Wextra -Werror -static -o "$out/sbx-capture" "$here/sbx-capture.c" -lbpf -lelf -lz
