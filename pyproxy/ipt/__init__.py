"""iptables: restore-text payloads (pure) and executors for iptables-restore (real and fake)."""
