"""The connection log: the guest's eBPF capture protocol, its parse and join into attempts
(monitor), the records and their store (records), the host-side flow record (hostflows), the
packet capture (pcap) and the views that print them (logview)."""
