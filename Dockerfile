# postfix-bridge: answers Postfix socketmap: and tcp: lookups from memcache.
#
#   docker build -t postfix-bridge .
#   docker run -d -v /etc/postfix-bridge:/etc/postfix-bridge:ro \
#       -p 127.0.0.1:10027:10027 -p 127.0.0.1:10028:10028 postfix-bridge
#
# The configuration is read from /etc/postfix-bridge/bridge.toml (mount it
# there; the image ships none, since the memcache address and the tables
# are the deployment's). Its listeners must bind 0.0.0.0 (or a unix socket
# in a shared volume, e.g. /run/postfix-bridge) to be reachable from
# outside the container. Logs go to stderr, which Docker captures exactly
# like stdout (`docker logs`), or with log_target = "syslog" to the host's
# /dev/log when it is mounted. examples/docker-compose.yml shows a whole
# deployment next to Postfix and memcached. The manual pages are in
# /usr/share/man (the slim base has no man-db: read docs/man/ on the host
# with `man -l`, or install man-db in a derived image).
FROM python:3.12-slim

# No .pyc files written at run time (site-packages is read-only for the
# daemon's user anyway); pip installs into the image's own Python as root
# on purpose, so neither its root warning nor its self-check is wanted.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric uid/gid (no name lookup needed by `USER`, Kubernetes'
# runAsNonRoot can verify it, and host files can be chowned to it).
# 10025 stays clear of the base image's system accounts (below 1000).
# /run/postfix-bridge holds the unix socket when one is configured: owned
# by the daemon's user so that a named volume mounted there inherits it.
RUN groupadd --gid 10025 postfix-bridge \
 && useradd --uid 10025 --gid 10025 --no-create-home --no-log-init \
        --home-dir /nonexistent --shell /usr/sbin/nologin postfix-bridge \
 && install -d -m 0755 /etc/postfix-bridge \
 && install -d -m 0755 -o 10025 -g 10025 /run/postfix-bridge /var/lib/postfix-bridge

WORKDIR /usr/src/postfix-bridge

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only
# when the dependency list changes, not on every source edit. The image
# carries the SQL drivers too (the pgsql and mysql extras), so pgsql: and
# mysql: backups work without building another image. --prefer-binary:
# the slim image has no compiler, so a wheel of an older version beats
# the newest version's source (pure-cdb has no 3.12 wheel of 4.x).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['pgsql'] + x['mysql']))" > requirements.txt \
 && pip install --no-cache-dir --prefer-binary -r requirements.txt

# Then the project itself (runtime code only: .dockerignore admits nothing
# else). The build backend lives in pip's temporary build environment, and
# the source tree goes once installed: nothing of the build stays behind.
COPY README.md ./
COPY bridge/ ./bridge/
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf /usr/src/postfix-bridge

# A directory the daemon's user owns (lmdb backups may live here); the
# daemon itself resolves relative paths against bridge.toml's directory.
WORKDIR /var/lib/postfix-bridge

# postfix-bridge(8) and postfix-bridge.toml(5), generated from the code
# (the slim image has no man-db to read them: the files only, a few KB).
# After the WORKDIR above: a step run in the removed source directory
# would create it again.
COPY docs/man/postfix-bridge.8 /usr/share/man/man8/
COPY docs/man/postfix-bridge.toml.5 /usr/share/man/man5/
USER 10025:10025

# 10027: socketmap listener, 10028: tcp_table listener (examples/bridge.toml).
EXPOSE 10027 10028

# The daemon handles SIGTERM itself (stop accepting, answer what was
# received, exit 0), also as PID 1; `docker run --init` is not needed.
STOPSIGNAL SIGTERM

# Asks the running daemon itself: GET /healthz when [metrics] is configured,
# otherwise one probe lookup through the first listener. Its own time limit
# is 10 s, so the 15 s here lets it report why it failed.
HEALTHCHECK --interval=30s --timeout=15s --start-period=10s --retries=3 \
    CMD ["postfix-bridge", "health", "--config", "/etc/postfix-bridge/bridge.toml"]

ENTRYPOINT ["postfix-bridge"]
CMD ["serve", "--config", "/etc/postfix-bridge/bridge.toml"]
