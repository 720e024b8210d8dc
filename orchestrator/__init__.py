"""sandbox: run untrusted software in a disposable libvirt VM with egress denied by default."""

__version__ = "0.1.0"
