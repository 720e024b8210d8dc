"""The virtual machine: the libvirt edge (hypervisor), the domain and network XML (domain), the
cloud-init seed (cloudinit), the base image recipe and cache (images) and the SSH channel into the
running guest (guest). Nothing here knows about egress policy or connection records."""
