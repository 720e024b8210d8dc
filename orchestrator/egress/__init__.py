"""Egress: the policy model (policy), its two enforcing layers rendered from it (firewall: the
guest's iptables; hostfilter: the host's nwfilter on the guest's interface), the guard on the
host's side of the sandbox bridge (hostguard) and the sandbox resolver's query log (dnslog)."""
