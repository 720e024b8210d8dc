"""The virtual machine: the libvirt edge (hypervisor), the domain and network XML (domain), the
cloud-init seed (cloudinit), the base image recipe and cache (images), the SSH channel into the
running guest (guest), the hop through a remote libvirt host (jump) and the files on the libvirt
host (hostfiles). Nothing here knows about egress policy or connection records."""
