"""The example Grafana dashboard and Prometheus alerts against a running bridge.

examples/grafana/postfix-bridge.json and examples/prometheus/alerts.yml
query the bridge's metrics by name. These tests keep them honest:

* a real bridge (with ``[metrics]``) in front of a real memcached is
  driven through every kind of answer the files look at (memcache hits,
  hot-cache hits, backup answers and shared backup queries, not found,
  TEMP, TIMEOUT, backup errors, a failed reload), its ``/metrics`` page is
  parsed with prometheus_client's parser, and every metric name, label and
  literal label value in every PromQL expression of both files must be
  among the samples it exports: renaming a metric or a label, or a result
  value, fails here;
* ``promtool check rules`` (Prometheus's own parser) checks the alert
  rules, and the dashboard's expressions too, put into a rules file of
  their own with Grafana's variables replaced;
* the dashboard's JSON is checked for what an import needs.

The extractor below is deliberately small: it reads selectors
(``name{label op "value"}``), grouping clauses (``by``, ``without``,
``on``, ``ignoring``, ``group_left``, ``group_right``) and function names,
and fails on anything it does not recognise rather than skipping it.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.proxy import Delay, FaultProxy
from tests.integration.conftest import NextPort, StartBridge
from tests.integration.harness import Memcached

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "postfix-bridge.json"
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"

#: Labels Prometheus adds to every scraped series (the target's).
TARGET_LABELS = frozenset({"instance", "job"})
#: Series Prometheus itself makes for every target, with their labels.
SYNTHETIC_SERIES = {"up": TARGET_LABELS}

#: The PromQL functions and aggregation operators the files may call.
FUNCTIONS = frozenset(
    {
        "abs", "absent", "avg", "avg_over_time", "ceil", "clamp_max", "clamp_min", "count",
        "delta", "floor", "histogram_quantile", "increase", "irate", "label_replace", "max",
        "max_over_time", "min", "min_over_time", "quantile", "rate", "round", "sum",
        "sum_over_time", "topk", "bottomk", "vector", "scalar",
    }
)  # fmt: skip
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})

#: Grafana's variables, as a Prometheus rule would spell them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


# ------------------------------------------------------------ PromQL


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...]


@dataclass
class Usage:
    """What one expression reads: its selectors and the labels it groups by."""

    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]\[]*\])
  | (?P<grouping>\b(?:by|without|on|ignoring|group_left|group_right)\b
        \s*(?:\((?P<labels>[^()]*)\))?)
  | (?P<selector>(?P<name>[a-zA-Z_:][\w:]*)\s*(?:\{(?P<matchers>(?:[^{}"]|"(?:[^"\\]|\\.)*")*)\})?)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<operator>==|!=|>=|<=|[-+*/%^<>(),])
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _parse_matchers(text: str) -> tuple[Matcher, ...]:
    matchers = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _MATCHER.match(text, position)
        assert match, f"cannot read label matchers {text!r} at {position}"
        matchers.append(Matcher(match[1], match[2], match[3]))
        position = match.end()
    return tuple(matchers)


def parse_promql(expr: str) -> Usage:
    """The selectors and grouping labels of one PromQL expression (see the module doc)."""
    usage = Usage()
    depth = 0
    position = 0
    while position < len(expr):
        token = _TOKEN.match(expr, position)
        assert token, f"unexpected text in {expr!r} at {position}: {expr[position:]!r}"
        position = token.end()
        if token["grouping"]:
            if token["labels"] is not None:
                usage.grouping.update(
                    label.strip() for label in token["labels"].split(",") if label.strip()
                )
        elif token["selector"]:
            name = token["name"]
            # A call: name(...), or an aggregation with its grouping first.
            followed_by_call = re.match(r"\s*(?:\(|(?:by|without)\b)", expr[position:]) is not None
            if name in FUNCTIONS and followed_by_call and token["matchers"] is None:
                continue
            assert not followed_by_call, f"unknown function {name!r} in {expr!r}"
            if name in KEYWORDS:
                continue
            usage.selectors.append(Selector(name, _parse_matchers(token["matchers"] or "")))
        elif token["operator"] == "(":
            depth += 1
        elif token["operator"] == ")":
            depth -= 1
            assert depth >= 0, f"unbalanced parentheses in {expr!r}"
        elif token["string"]:
            # label_replace's arguments, or a literal: not used in the files.
            raise AssertionError(f"string outside a selector in {expr!r}")
    assert depth == 0, f"unbalanced parentheses in {expr!r}"
    assert usage.selectors, f"no series in {expr!r}"
    return usage


def test_the_extractor_reads_selectors_and_grouping() -> None:
    usage = parse_promql(
        'histogram_quantile(0.99, sum by (le, table) (rate(a_bucket{table=~"$t", x="1"}[5m])))'
        " / ignoring (result) group_left sum(b_total) > 0.5"
    )
    assert usage.selectors == [
        Selector("a_bucket", (Matcher("table", "=~", "$t"), Matcher("x", "=", "1"))),
        Selector("b_total", ()),
    ]
    assert usage.grouping == {"le", "table", "result"}
    with pytest.raises(AssertionError, match="unknown function"):
        parse_promql("rates(a_total[5m])")
    with pytest.raises(AssertionError, match="unbalanced"):
        parse_promql("sum(rate(a_total[5m])")


# ------------------------------------------------------------ the two files


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


_LABEL_VALUES = re.compile(r"label_values\((?P<series>[^,]+),\s*(?P<label>\w+)\)")


def variable_exprs() -> list[tuple[str, str]]:
    """The dashboard's ``label_values(series, label)`` variables, as PromQL that reads the same."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = _LABEL_VALUES.fullmatch(var["definition"])
            assert match, var["definition"]
            exprs.append(
                (f"variable {var['name']}", f"count by ({match['label']}) ({match['series']})")
            )
    return exprs


def all_exprs() -> list[tuple[str, str]]:
    """(where, expression) of both files."""
    exprs = [(f"dashboard panel {title!r}", expr) for title, expr in dashboard_exprs()]
    exprs += variable_exprs()
    exprs += [(f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()]
    return exprs


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["id"] is None  # imports as a new dashboard
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["table"]["type"] == "query"
    assert "label_values(postfix_bridge_requests_total" in variables["table"]["definition"]
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == datasource, var["name"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in dashboard["panels"]:
        title = panel["title"]
        assert panel["datasource"] == datasource, title
        assert panel["type"] in {"timeseries", "stat"}, title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
        assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["datasource"] == datasource, title
            assert target["expr"].strip(), title
    # The panels the issue asks for read these.
    used = {s.metric for _, expr in dashboard_exprs() for s in parse_promql(expr).selectors}
    for needed in (
        "postfix_bridge_requests_total",
        "postfix_bridge_request_seconds_bucket",
        "postfix_bridge_memcache_errors_total",
        "postfix_bridge_backup_errors_total",
        "postfix_bridge_cache_hits_total",
        "postfix_bridge_backup_lookups_total",
        "postfix_bridge_open_connections",
    ):
        assert needed in used, needed


_DURATION = re.compile(r"(?:\d+(?:ms|[smhdwy]))+")


def test_the_alert_rules_have_what_alertmanager_needs() -> None:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(document) == {"groups"}
    names = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"], group
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in names, rule["alert"]
            names.add(rule["alert"])
            assert _DURATION.fullmatch(str(rule["for"])), rule
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule
            assert set(rule["annotations"]) == {"summary", "description"}, rule
            parse_promql(rule["expr"])
    # The alerts the issue asks for.
    assert {
        "PostfixBridgeTempAnswers",
        "PostfixBridgeBackupFailing",
        "PostfixBridgeUnhealthy",
        "PostfixBridgeReloadFailed",
    } <= names


def _promtool() -> str:
    """promtool: on PATH, or in the venv where tests/run.sh puts it."""
    for candidate in (Path(sys.executable).parent / "promtool", Path(sys.prefix) / "bin/promtool"):
        if candidate.exists():
            return str(candidate)
    found = subprocess.run(["which", "promtool"], capture_output=True, text=True, check=False)
    assert found.returncode == 0, "promtool missing: tests/run.sh installs it"
    return found.stdout.strip()


def _promtool_check(path: Path) -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    _promtool_check(ALERTS)


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    rules = []
    for index, (_, expr) in enumerate(dashboard_exprs()):
        query = expr
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:panel_query_{index}", "expr": query})
    assert rules
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool_check(path)


# ------------------------------------------------------------ a running bridge


def _get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _ask(port: int, table: str, key: str) -> str:
    """One socketmap lookup; the reply (``OK value``, ``NOTFOUND ``, ``TEMP ...``)."""
    payload = f"{table} {key}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"%d:%s," % (len(payload), payload))
        reply = b""
        while not (reply.endswith(b",") and b":" in reply):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    return reply.partition(b":")[2][:-1].decode()


@dataclass
class Exported:
    """What a /metrics page exports: labels and label values by sample name."""

    labels: dict[str, set[str]]
    values: dict[tuple[str, str], set[str]]


def _exported(text: str) -> Exported:
    labels: dict[str, set[str]] = defaultdict(set)
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name].update(sample.labels)
            for label, value in sample.labels.items():
                values[sample.name, label].add(value)
    return Exported(dict(labels), dict(values))


def _literal_values(matcher: Matcher) -> list[str]:
    """The label values a matcher names literally (none for variables and real regexes)."""
    if "$" in matcher.value:
        return []  # a Grafana variable
    if matcher.op == "=":
        return [matcher.value]
    if matcher.op == "=~" and re.fullmatch(r"[\w.-]+(?:\|[\w.-]+)*", matcher.value):
        return matcher.value.split("|")
    return []


def problems_with(where: str, expr: str, exported: Exported) -> list[str]:
    """Every metric, label or label value of ``expr`` that ``exported`` lacks."""
    usage = parse_promql(expr)
    problems = []
    for selector in usage.selectors:
        name = selector.metric
        if name in SYNTHETIC_SERIES:
            labels = set(SYNTHETIC_SERIES[name])
        elif name in exported.labels:
            labels = exported.labels[name] | TARGET_LABELS
        else:
            problems.append(f"{where}: metric {name} is not exported")
            continue
        for matcher in selector.matchers:
            if matcher.label not in labels:
                problems.append(f"{where}: {name} has no label {matcher.label}")
            elif matcher.label not in TARGET_LABELS:
                seen = exported.values.get((name, matcher.label), set())
                for value in _literal_values(matcher):
                    if value not in seen:
                        problems.append(
                            f"{where}: {name}{{{matcher.label}={value!r}}} never exported "
                            f"(seen: {sorted(seen)})"
                        )
        # Grouping labels must be on every series the expression reads.
        for label in usage.grouping - labels:
            problems.append(f"{where}: groups by {label}, which {name} does not have")
    return problems


@contextlib.contextmanager
def _never_answering_port() -> Iterator[int]:
    """A port whose connections the kernel completes but nobody ever reads."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _concurrently(port: int, table: str, key: str, clients: int) -> list[str]:
    """The same lookup from ``clients`` connections at once."""
    replies: list[str] = []
    start = threading.Barrier(clients)

    def client() -> None:
        start.wait()
        replies.append(_ask(port, table, key))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return replies


@pytest.fixture
def scraped(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> Iterator[Exported]:
    """/metrics of a bridge that gave every kind of answer the two files look at."""
    sm, metrics_port, closed = ports(), ports(), ports()
    backup = tmp_path / "backup"
    backup.write_text("b1 from-backup\n" + "".join(f"s{i} shared-{i}\n" for i in range(20)))
    with _never_answering_port() as stalled, FaultProxy(memcached.port) as slow:
        # Memcache replies 0.2 s late for the table "shared": concurrent
        # lookups of a missing key wait together, and share one backup query.
        slow.set_fault(Delay(ms=200))
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'[metrics]\nendpoint = "inet:127.0.0.1:{metrics_port}"\nhealth_interval = 0.2\n'
            f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm}"\nprotocol = "socketmap"\n'
            # memcache hits, hot-cache hits, backup answers, not found
            f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\n'
            f'backup = "texthash:{backup}"\nhot_cache_ttl = 600\n'
            # shared backup queries
            f'[tables.shared]\nmemcache = "{slow.endpoint}"\nkey_format = "shared:%s"\n'
            f'backup = "texthash:{backup}"\n'
            # TEMP: memcache refuses, no backup
            f'[tables.down]\nmemcache = "inet:127.0.0.1:{closed}"\nmax_try = 1\n'
            # TIMEOUT: memcache never answers
            f'[tables.stalled]\nmemcache = "inet:127.0.0.1:{stalled}"\n'
            "timeout = 1\nmax_try = 1\n"
            # backup errors: a proxy: backup with no proxymap socket
            f'[tables.broken]\nmemcache = "{memcached.endpoint}"\nkey_format = "broken:%s"\n'
            f'backup = "proxy:texthash:{backup}"\nqueue_directory = "{tmp_path}/no-queue"\n'
        )
        bridge = start_bridge(config)
        memcached.set(b"k0", b"from-memcache")
        assert _ask(sm, "aliases", "k0") == "OK from-memcache"
        assert _ask(sm, "aliases", "k0") == "OK from-memcache"  # the hot cache
        assert _ask(sm, "aliases", "b1") == "OK from-backup"
        assert _ask(sm, "aliases", "nothing") == "NOTFOUND "
        assert _ask(sm, "down", "k0").startswith("TEMP ")
        assert _ask(sm, "stalled", "k0").startswith("TIMEOUT ")
        assert _ask(sm, "broken", "k0").startswith("TEMP ")

        def metrics() -> Exported:
            status, body = _get(metrics_port, "/metrics")
            assert status == 200
            return _exported(body.decode())

        def shared() -> bool:
            return "postfix_bridge_backup_shared_total" in metrics().labels

        for i in range(20):
            replies = _concurrently(sm, "shared", f"s{i}", clients=4)
            assert replies == [f"OK shared-{i}"] * 4
            if shared():
                break
        assert shared(), "no backup query was shared"

        # A reload that fails (the running configuration stays).
        good = config.read_text()
        config.write_text("[tables.aliases\n")
        bridge.signal(signal.SIGHUP)
        _wait_for(
            lambda: (
                "failed"
                in metrics().values.get(("postfix_bridge_config_reloads_total", "result"), set())
            ),
            "a failed reload",
        )
        config.write_text(good)
        _wait_for(lambda: "postfix_bridge_healthy" in metrics().labels, "the health gauge")
        yield metrics()


def test_every_metric_and_label_the_files_use_is_exported(scraped: Exported) -> None:
    problems = [
        problem for where, expr in all_exprs() for problem in problems_with(where, expr, scraped)
    ]
    assert not problems, "\n".join(problems)
    # The check has teeth: a renamed metric, label or value is caught.
    renamed = [
        'sum(rate(postfix_bridge_request_total{table="aliases"}[5m]))',
        'sum(rate(postfix_bridge_requests_total{tables="aliases"}[5m]))',
        'sum(rate(postfix_bridge_requests_total{result="tempfail"}[5m]))',
        "sum by (server) (rate(postfix_bridge_requests_total[5m]))",
        "histogram_quantile(0.9, sum by (le) (rate(postfix_bridge_request_seconds[5m])))",
    ]
    for expr in renamed:
        assert problems_with("renamed", expr, scraped), expr
