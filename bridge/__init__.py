"""postfix-bridge: Postfix socketmap/tcp_table lookups answered from memcache tables.

General layout
--------------
Where each behaviour lives, from the wire inwards (the rules the code
cites, MC-13, SM-9, AS-6 ..., are defined in docs/behaviour.md):

Process and connections
  ``cli``            the command line: parses arguments, loads the
                     configuration, maps errors to exit statuses
  ``daemon``         ``serve`` as a process: open-files limit, binding,
                     privileges, signals, systemd, one process or workers
  ``workers``        the supervisor of ``workers = N`` forked processes
  ``listeners``      binding listeners; unix socket-file ownership
  ``server``         accept loops, reload, and the per-connection task
                     (``serving = "tasks"``)
  ``multiplex``      one task serving every connection (``serving =
                     "events"``, the default): epoll, deadline heap
  ``dialect``        what differs between socketmap and tcp_table
                     connections; how an outcome becomes a reply
  ``netio``          non-blocking sockets driven by trio's low-level waits
  ``http``           the ``[metrics]`` listener (/metrics, /healthz)
  ``metrics``, ``logs``, ``systemd``: observability (``logs``: stderr or
                     syslog lines) and service manager

Wire formats, sans-I/O (bytes in, events and bytes out)
  ``protocol.events``     the vocabulary every codec shares
  ``protocol.netstring``, ``protocol.socketmap``, ``protocol.tcptable``,
  ``protocol.memcache``, ``protocol.proxymap``
                          one module per wire format, both ends

The lookup
  ``table``          one memcache_table(5) table: the lookup algorithm,
                     writes, the hot cache
  ``address_search`` the partial keys Postfix asks a fixed table for, and
                     finishing a hit as Postfix's address mapping would
  ``keys``           case folding, key_format, key_digest, the domain filter
  ``outcome``        the four outcomes of a lookup and of a write
  ``memcache``       the client, the ketama ring, a table's pool of servers
  ``maps``           backup and domain table types, one module each plus
                     the registry in ``maps/__init__``; ``maps.sql`` holds
                     the pgsql, mysql and sqlite types and what they share

Configuration
  ``config``         the parameter schema (every default written once),
                     converters and loaders for the TOML file
  ``postfix_cf``     Postfix's ``.cf`` files (memcache_table(5) and kin)
  ``postfix_text``   Postfix's logical-line reader
  ``endpoint``       ``inet:``/``unix:`` endpoint syntax
  ``reference``      the configuration reference rendered from the schema
  ``manpages``       postfix-bridge(8) and postfix-bridge.toml(5), rendered
                     from the schema and the argument parser
  ``loader``         ``postfix-bridge load``: bulk load from a source file
  ``migrate``        ``postfix-bridge migrate``'s plan, pure: postconf output
                     in, bridge.toml and postconf commands out
  ``migrate_run``    the command around it: postconf, the bridge's loader,
                     --verify with postmap, the all-or-nothing --apply

Adding a table type is one module under ``maps/`` plus one entry in
``maps.TABLE_TYPES``; adding a parameter is one entry in
``config._schema`` plus the code that uses it.
"""

__version__ = "0.1.0"
