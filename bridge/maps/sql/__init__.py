"""SQL backup and domain tables: ``pgsql:``, ``mysql:`` and ``sqlite:`` (SQL-1 .. SQL-7).

Each type reads Postfix's own table file unchanged (pgsql_table(5),
mysql_table(5), sqlite_table(5)) and answers lookups as Postfix's client
for that database would: the same query text, quoted the same way, the
same joined answer, TEMP where Postfix fails temporarily. All three are
read-only (SQL-7).

Layout
------
``templates``   query and result_format expansion, the joined answer (SQL-4, SQL-5)
``settings``    the ``.cf`` parameters with Postfix's defaults, the legacy
                query form, hosts lists, password redaction (SQL-1 .. SQL-3)
``client``      :class:`~bridge.maps.sql.client.SqlMap`: host choice and the
                penalty box, connections, worker threads, deadlines,
                health (SQL-6)
``common``      what opening any of the three takes
``pgsql``, ``mysql``, ``sqlite``: one module per engine, each with its
                driver and its registry record ``TABLE_TYPE``

The database drivers (psycopg, PyMySQL) are imported only when a table
of their type is opened; sqlite uses Python's own ``sqlite3``.
"""
