"""postfix-bridge: Postfix socketmap/tcp_table lookups answered from memcache tables."""

__version__ = "0.1.0"
