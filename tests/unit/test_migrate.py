"""``postfix-bridge migrate``'s planning: postconf output in, bridge.toml and commands out."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from bridge import migrate_run
from bridge.cli import build_parser
from bridge.config import load_config
from bridge.migrate import (
    Location,
    Plan,
    PostfixSettings,
    make_plan,
    parse_postconf,
    parse_postconf_master,
    render_toml,
    split_tokens,
)
from bridge.migrate_run import PostfixConfig, plan_migration

LISTEN = "inet:127.0.0.1:10027"
SM = f"socketmap:{LISTEN}"

DEFAULT_SETTINGS = PostfixSettings.from_postconf(
    parse_postconf(
        "recipient_delimiter = +\n"
        "parent_domain_matches_subdomains = debug_peer_list,fast_flush_domains,mynetworks,"
        "permit_mx_backup_networks,qmqpd_authorized_clients,relay_domains,smtpd_access_maps\n"
        "propagate_unmatched_extensions = canonical, virtual\n"
        "mydestination = Mail.Example.com, localhost, hash:/etc/postfix/dest\n"
    )
)


def plan(
    main: str,
    master: str = "",
    *,
    settings: PostfixSettings = DEFAULT_SETTINGS,
    unusable: dict[str, str] | None = None,
) -> Plan:
    return make_plan(
        parse_postconf(main),
        parse_postconf_master(master),
        settings,
        listen=LISTEN,
        config_dir="/etc/postfix",
        unusable=unusable,
    )


def searches(result: Plan) -> dict[str, object]:
    return {table.name: table.settings["address_search"] for table in result.tables}


# ------------------------------------------------------------ postconf output


def test_postconf_output_is_parsed() -> None:
    main = parse_postconf("a = b c\nempty =\nnot a line\n")
    assert main == {"a": "b c", "empty": ""}
    master = parse_postconf_master("submission/inet/smtpd_x = y, z\nbad/line = q\n")
    assert master == {Location("smtpd_x", "submission", "inet"): "y, z"}


def test_tokens_split_at_commas_and_spaces_outside_braces() -> None:
    words = [t.text for t in split_tokens("a, b  c,d,inline:{ x=1, y=2 } e")]
    assert words == ["a", "b", "c", "d", "inline:{ x=1, y=2 }", "e"]


def test_settings_from_postconf() -> None:
    assert DEFAULT_SETTINGS.recipient_delimiter == "+"
    assert DEFAULT_SETTINGS.propagate_unmatched_extensions == ("canonical", "virtual")
    # mydestination's domains, folded; tables in it are not domains.
    assert DEFAULT_SETTINGS.local_domains == ("mail.example.com", "localhost")


# ------------------------------------------------------------ parameter kinds


def test_each_parameter_kind_gets_postfix_search() -> None:
    result = plan(
        "virtual_alias_maps = memcache:/etc/postfix/virtual.cf\n"
        "canonical_maps = memcache:/etc/postfix/canonical.cf\n"
        "smtp_generic_maps = memcache:/etc/postfix/generic.cf\n"
        "transport_maps = memcache:/etc/postfix/transport.cf\n"
        "relay_domains = memcache:/etc/postfix/relay.cf\n"
        "virtual_alias_domains = memcache:/etc/postfix/valias-domains.cf\n"
        "sender_dependent_relayhost_maps = memcache:/etc/postfix/relayhost.cf\n"
    )
    assert searches(result) == {
        "virtual": ["full", "nodelim", "localpart", "@domain"],
        "canonical": ["full", "nodelim", "localpart", "@domain"],
        "generic": ["full", "nodelim", "localpart", "@domain"],
        "transport": ["full", "nodelim", "domain", ".parent_domains"],
        # relay_domains is in parent_domain_matches_subdomains, virtual_alias_domains is not.
        "relay": ["full", "parent_domains"],
        "valias-domains": ["full", ".parent_domains"],
        "relayhost": ["full"],
    }
    tables = {table.name: table for table in result.tables}
    assert tables["virtual"].settings["address_mapping"] == "virtual"
    assert tables["canonical"].settings["address_mapping"] == "canonical"
    assert tables["generic"].settings["address_mapping"] == "generic"
    assert tables["virtual"].settings["local_domains"] == ["mail.example.com", "localhost"]
    assert tables["virtual"].settings["propagate_unmatched_extensions"] == [
        "canonical",
        "virtual",
    ]
    assert tables["transport"].settings["recipient_delimiter"] == "+"
    assert "address_mapping" not in tables["transport"].settings


def test_restriction_lists_take_the_kind_of_their_check() -> None:
    result = plan(
        "smtpd_recipient_restrictions = check_recipient_access memcache:/p/rcpt.cf,"
        " permit_mynetworks, reject_unauth_destination\n"
        "smtpd_client_restrictions = check_client_access memcache:/p/client.cf\n"
        "smtpd_helo_restrictions = check_helo_access memcache:/p/helo.cf\n"
        "smtpd_sender_restrictions = check_sender_mx_access memcache:/p/mx.cf,"
        " check_sender_access memcache:/p/sender.cf\n"
        "smtpd_restriction_classes = special\n"
        "special = check_sasl_access memcache:/p/sasl.cf\n"
    )
    access = ["full", "nodelim", "domain", "parent_domains", "localpart@"]
    assert searches(result) == {
        "rcpt": access,
        "sender": access,
        "client": ["full", "parent_domains", "networks"],
        "mx": ["full", "parent_domains", "networks"],
        "helo": ["full", "parent_domains"],
        "sasl": ["full"],
    }
    assert result.changes[Location("smtpd_recipient_restrictions")] == (
        f"check_recipient_access {SM}:rcpt, permit_mynetworks, reject_unauth_destination"
    )


def test_access_parents_follow_parent_domain_matches_subdomains() -> None:
    settings = PostfixSettings("", ("relay_domains", "transport_maps"), (), ())
    result = plan(
        "smtpd_recipient_restrictions = check_recipient_access memcache:/p/rcpt.cf\n"
        "transport_maps = memcache:/p/transport.cf\n",
        settings=settings,
    )
    assert searches(result) == {
        "rcpt": ["full", "nodelim", "domain", ".parent_domains", "localpart@"],
        "transport": ["full", "nodelim", "domain", "parent_domains"],
    }
    assert result.tables[0].settings["recipient_delimiter"] == ""


def test_proxy_wrapping_is_kept() -> None:
    result = plan(
        "virtual_alias_maps = proxy:memcache:/p/aliases.cf, hash:/p/other\n"
        "proxy_read_maps = $virtual_alias_maps proxy:memcache:/p/aliases.cf proxy:hash:/p/x\n"
    )
    assert result.changes[Location("virtual_alias_maps")] == (f"proxy:{SM}:aliases, hash:/p/other")
    # proxymap opens only what proxy_read_maps lists: the new name replaces the old.
    assert result.changes[Location("proxy_read_maps")] == (
        f"$virtual_alias_maps proxy:{SM}:aliases proxy:hash:/p/x"
    )


def test_master_cf_overrides_are_changed_with_postconf_p() -> None:
    result = plan(
        "",
        "submission/inet/smtpd_recipient_restrictions = check_recipient_access"
        " memcache:/p/access.cf, permit_sasl_authenticated, reject\n",
    )
    location = Location("smtpd_recipient_restrictions", "submission", "inet")
    # postconf -P refuses whitespace in a value: the words are joined by commas.
    new = f"check_recipient_access,{SM}:access,permit_sasl_authenticated,reject"
    assert result.changes == {location: new}
    override = f"submission/inet/smtpd_recipient_restrictions={new}"
    assert result.commands() == [["postconf", "-c", "/etc/postfix", "-P", override]]


def test_main_cf_commands_come_first() -> None:
    result = plan(
        "virtual_alias_maps = memcache:/p/a.cf\n",
        "smtp/inet/virtual_alias_maps = memcache:/p/a.cf\n",
    )
    commands = result.shell_commands()
    assert commands == [
        f"postconf -c /etc/postfix -e 'virtual_alias_maps = {SM}:a'",
        f"postconf -c /etc/postfix -P smtp/inet/virtual_alias_maps={SM}:a",
    ]
    assert len(result.tables) == 1


def test_a_table_in_two_kinds_gets_a_name_per_kind() -> None:
    result = plan(
        "virtual_alias_maps = memcache:/p/shared.cf\n"
        "smtpd_recipient_restrictions = check_recipient_access memcache:/p/shared.cf\n"
        "transport_maps = memcache:/q/shared.cf\n"
    )
    assert sorted(searches(result)) == ["shared", "shared-access", "shared-virtual"]
    files = {table.name: (table.file, table.kind) for table in result.tables}
    assert files["shared-virtual"] == ("/p/shared.cf", "virtual")
    assert files["shared-access"] == ("/p/shared.cf", "access")
    assert files["shared"] == ("/q/shared.cf", "transport")
    assert result.changes[Location("virtual_alias_maps")] == f"{SM}:shared-virtual"


# ----------------------------------------------------------------- refusals


def test_uses_that_cannot_be_told_are_left_alone() -> None:
    result = plan(
        "smtpd_recipient_restrictions = memcache:/p/bare.cf, permit\n"
        "my_maps = memcache:/p/referenced.cf\n"
        "virtual_alias_maps = $my_maps\n"
        "transport_maps = memcache:relative.cf\n",
        "submission/inet/smtpd_client_restrictions = check_client_access memcache:/p/c.cf,"
        " check_client_access inline:{ 1.2.3.4 = OK }\n",
    )
    assert not result.tables
    assert not result.changes
    reasons = {refused.file: refused.reason for refused in result.refused}
    assert set(reasons) == {"/p/bare.cf", "/p/referenced.cf", "relative.cf", "/p/c.cf"}
    assert "check_*_access" in reasons["/p/bare.cf"]
    assert "$my_maps" in reasons["/p/referenced.cf"]
    assert "not absolute" in reasons["relative.cf"]
    assert "postconf -P" in reasons["/p/c.cf"]


def test_a_restriction_list_named_as_dollar_name_is_migrated() -> None:
    # Debian's master.cf: -o smtpd_client_restrictions=$mua_client_restrictions
    result = plan(
        "mua_client_restrictions = check_client_access memcache:/p/mua.cf, permit\n",
        "submission/inet/smtpd_client_restrictions = $mua_client_restrictions\n",
    )
    assert searches(result) == {"mua": ["full", "parent_domains", "networks"]}
    assert result.changes == {
        Location("mua_client_restrictions"): f"check_client_access {SM}:mua, permit"
    }
    assert not result.refused


def test_written_and_security_sensitive_tables_are_left_alone() -> None:
    result = plan(
        "address_verify_map = memcache:/p/verify.cf\n"
        "postscreen_cache_map = proxy:memcache:/p/psc.cf\n"
        "virtual_mailbox_maps = memcache:/p/mailbox.cf\n"
    )
    assert not result.tables
    reasons = {refused.file: refused.reason for refused in result.refused}
    assert "read-only" in reasons["/p/verify.cf"]
    assert "read-only" in reasons["/p/psc.cf"]
    assert "security-sensitive" in reasons["/p/mailbox.cf"]


def test_tables_searched_in_ways_not_modelled_get_a_note() -> None:
    result = plan("relay_recipient_maps = memcache:/p/relay.cf\n")
    assert searches(result) == {"relay": ["full"]}
    assert len(result.notes) == 1
    assert "relay_recipient_maps" in result.notes[0]


def test_an_unusable_file_is_left_alone_everywhere() -> None:
    result = plan(
        "virtual_alias_maps = memcache:/p/bad.cf, memcache:/p/good.cf\n"
        "smtpd_recipient_restrictions = check_recipient_access memcache:/p/bad.cf\n",
        unusable={"/p/bad.cf": "cannot read file"},
    )
    assert [table.name for table in result.tables] == ["good"]
    assert result.changes == {
        Location("virtual_alias_maps"): f"memcache:/p/bad.cf, {SM}:good",
    }
    assert result.refused_files == ["/p/bad.cf"]
    assert result.refused[0].reason == "cannot read file"


# ---------------------------------------------------------------- the TOML


def _write_cf(path: Path, backup: str) -> None:
    path.write_text(f"memcache = inet:127.0.0.1:11211\nbackup = {backup}\n")


def test_the_generated_toml_loads(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("a@example.com b@example.net\n")
    _write_cf(tmp_path / "aliases.cf", f"texthash:{tmp_path}/aliases")
    _write_cf(tmp_path / "access.cf", "inline:{ bad@example.com=REJECT }")
    result = plan(
        f"virtual_alias_maps = memcache:{tmp_path}/aliases.cf\n"
        f"smtpd_recipient_restrictions = check_recipient_access memcache:{tmp_path}/aliases.cf,"
        f" check_recipient_access memcache:{tmp_path}/access.cf\n"
        f"transport_maps = proxy:memcache:{tmp_path}/access.cf\n"
    )
    toml = tmp_path / "bridge.toml"
    toml.write_text(render_toml(result))
    config = load_config(str(toml))
    assert sorted(config.tables) == [
        "access-access",
        "access-transport",
        "aliases-access",
        "aliases-virtual",
    ]
    virtual = config.tables["aliases-virtual"]
    assert virtual.address_search == ("full", "nodelim", "localpart", "@domain")
    assert virtual.address_mapping == "virtual"
    assert virtual.local_domains == ("mail.example.com", "localhost")
    assert config.tables["aliases-access"].address_mapping == "none"
    assert config.listeners[0].protocol == "socketmap"
    assert str(config.listeners[0].endpoint) == LISTEN


def test_files_the_bridge_cannot_load_are_refused(tmp_path: Path) -> None:
    _write_cf(tmp_path / "good.cf", "inline:{ a=b }")
    _write_cf(tmp_path / "hash.cf", "hash:/etc/postfix/x")
    (tmp_path / "syntax.cf").write_text("no equals sign here\n")
    main = parse_postconf(
        f"virtual_alias_maps = memcache:{tmp_path}/good.cf, memcache:{tmp_path}/hash.cf,"
        f" memcache:{tmp_path}/syntax.cf, memcache:{tmp_path}/missing.cf\n"
    )
    postfix = PostfixConfig("/etc/postfix", main, {}, DEFAULT_SETTINGS)
    result = plan_migration(postfix, LISTEN)
    assert [table.name for table in result.tables] == ["good"]
    reasons = {refused.file: refused.reason for refused in result.refused}
    assert set(reasons) == {f"{tmp_path}/{name}.cf" for name in ("hash", "syntax", "missing")}
    assert "unsupported table type 'hash'" in reasons[f"{tmp_path}/hash.cf"]
    assert "line 1" in reasons[f"{tmp_path}/syntax.cf"]
    assert "cannot read file" in reasons[f"{tmp_path}/missing.cf"]


# ----------------------------------------------------------------- command


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["migrate", *argv])


def test_migrate_takes_postfix_c_and_defaults() -> None:
    args = _args()
    assert args.postfix_config == "/etc/postfix"
    assert args.listen == LISTEN
    assert (args.output, args.keys, args.verify, args.apply) == (None, None, False, False)
    assert _args("-c", "/tmp/pf").postfix_config == "/tmp/pf"


def test_apply_without_verify_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate_run.run(_args("-c", "/nonexistent", "--apply")) == migrate_run.EXIT_USAGE
    assert "--apply needs --verify" in capsys.readouterr().err


def test_a_bad_listen_endpoint_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate_run.run(_args("--listen", "tcp:somewhere")) == migrate_run.EXIT_USAGE
    assert "--listen tcp:somewhere" in capsys.readouterr().err


def test_an_unreadable_postfix_directory_is_a_config_error() -> None:
    status = migrate_run.run(_args("-c", "/nonexistent/postfix-dir"))
    assert status == migrate_run.EXIT_CONFIG


def test_apply_restores_both_files_when_a_command_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "main.cf").write_text("virtual_alias_maps = memcache:/p/a.cf\n")
    (tmp_path / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    log = tmp_path / "ran"
    # A postconf that changes main.cf for -e and fails for -P.
    fake = tmp_path / "postconf"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'case "$3" in\n'
        f"  -e) echo changed > {tmp_path}/main.cf ;;\n"
        f"  -P) echo broken > {tmp_path}/master.cf; echo 'postconf: fatal: no' >&2; exit 1 ;;\n"
        "esac\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(migrate_run, "_tool", lambda name: str(fake))
    result = make_plan(
        parse_postconf("virtual_alias_maps = memcache:/p/a.cf\n"),
        parse_postconf_master("smtp/inet/virtual_alias_maps = memcache:/p/a.cf\n"),
        DEFAULT_SETTINGS,
        listen=LISTEN,
        config_dir=str(tmp_path),
    )
    with pytest.raises(migrate_run.MigrateError) as raised:
        migrate_run.apply(result)
    assert raised.value.status == migrate_run.EXIT_APPLY_FAILED
    assert "restored" in str(raised.value)
    assert len(log.read_text().splitlines()) == 2  # -e ran, then -P failed
    assert (tmp_path / "main.cf").read_text() == "virtual_alias_maps = memcache:/p/a.cf\n"
    assert (tmp_path / "master.cf").read_text() == "smtp inet n - n - - smtpd\n"
    assert os.path.exists(tmp_path / "main.cf.before-migrate")


def test_two_files_with_one_name_get_distinct_table_names() -> None:
    result = plan("virtual_alias_maps = memcache:/p/a.cf, memcache:/q/a.cf, memcache:/r/m.x.cf\n")
    assert [(table.name, table.file) for table in result.tables] == [
        ("a", "/p/a.cf"),
        ("a-2", "/q/a.cf"),
        ("m_x", "/r/m.x.cf"),  # TOML bare keys: no dots
    ]
