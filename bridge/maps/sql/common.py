"""What opening any SQL table takes: the name check, the file, domain tables, the time limit.

The engine modules (:mod:`~bridge.maps.sql.pgsql`, :mod:`~bridge.maps.sql.mysql`,
:mod:`~bridge.maps.sql.sqlite`) read their own parameters and build their
driver; everything else about opening a table is here, once.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from bridge.keys import DomainFilter
from bridge.maps.base import LookupMap, MapError, OpenOptions
from bridge.maps.sql.client import DEFAULT_TIMEOUT

__all__ = [
    "check_name",
    "config_path",
    "import_driver",
    "lookup_timeout",
    "open_domain_maps",
    "opening",
]

# .cf files being opened in this thread: a domain list that names its own
# table (directly or through another) would otherwise recurse forever.
_opening = threading.local()


def check_name(table_type: str, name: str) -> None:
    """SQL-1: the name must be a file name starting with ``/`` or ``.``.

    Raises:
      MapError: an empty name, or Postfix's obsolete form (main.cf
        parameters prefixed with the name), which the bridge does not read.
    """
    if not name:
        raise MapError(f"missing configuration file name after '{table_type}:'")
    if not name.startswith(("/", ".")):
        raise MapError(
            f"'{table_type}:{name}' is Postfix's obsolete form (main.cf parameters "
            f"named {name}_...), which the bridge does not read: move the parameters "
            f"into a file and name it as {table_type}:/etc/postfix/{name}.cf"
        )


def config_path(name: str, options: OpenOptions) -> str:
    """The ``.cf`` file a name stands for; relative names resolve against ``base_dir``."""
    return name if os.path.isabs(name) else os.path.normpath(os.path.join(options.base_dir, name))


def lookup_timeout(options: OpenOptions) -> float:
    """Seconds one lookup may take: the table's ``timeout``, or the default."""
    if options.timeout is None or options.timeout <= 0:
        return DEFAULT_TIMEOUT
    return options.timeout


def import_driver(spec: str, module: str, extra: str) -> ModuleType:
    """Import a database driver only when a table needs it.

    Raises:
      MapError: the driver is not installed; the message says which extra
        installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MapError(
            f"table {spec}: the Python driver {module!r} is not installed ({exc}); "
            f"install it with: pip install 'postfix-bridge[{extra}]'"
        ) from None


@contextmanager
def opening(spec: str, path: str) -> Iterator[None]:
    """Mark ``path`` as being opened, refusing a table that contains itself.

    Raises:
      MapError: ``path`` is already being opened further up (a domain loop).
    """
    stack: set[str] = getattr(_opening, "paths", set())
    _opening.paths = stack
    real = os.path.realpath(path)
    if real in stack:
        raise MapError(f"table {spec}: its domain list leads back to {path}")
    stack.add(real)
    try:
        yield
    finally:
        stack.discard(real)


def open_domain_maps(
    spec: str, domain: DomainFilter | None, options: OpenOptions
) -> dict[str, LookupMap]:
    """Open the ``type:name`` items of a ``domain`` list (DOM-6: read-only, no folding).

    Raises:
      MapError: an item cannot be opened (the message names the table).
    """
    if domain is None or not domain.table_specs:
        return {}
    # Imported here: the registry imports this package.
    from bridge.maps import open_map  # noqa: PLC0415

    item_options = OpenOptions(
        options.base_dir, fold=False, smtputf8=options.smtputf8, timeout=options.timeout
    )
    opened: dict[str, LookupMap] = {}
    for item in domain.table_specs:
        try:
            opened[item] = open_map(item, item_options)
        except MapError as exc:
            raise MapError(f"table {spec}: domain: {exc}") from None
    return opened
