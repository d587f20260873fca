"""masqctl import / export: legacy scripts -> the role's table variables (YAML).

The importer is checked against the agent itself: every generated script is also run
line by line, as masqctl runs it, through a real Service (with FakeNftables), and the
imported tables must be the tables the agent holds afterwards, in order."""

import io
import os
import re
import shutil
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqd import import_export, ipmasqadm, legacy_import, masqctl, yaml_out
from masqd.client import MasqdError
from masqd.nft import FakeNftables
from masqd.service import Service

EXAMPLES = int(os.environ.get("MASQD_FUZZ_EXAMPLES", 150))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
TABLES = [table for table, _variable in legacy_import.TABLE_VARIABLES]


class FakeLookup:
    """/etc/hosts and /etc/services for the tests: nothing leaves the process."""

    hosts = {"extip": "198.51.100.1", "web1": "10.16.0.27"}
    services = {"www": 80, "http": 80}

    def host_address(self, name):
        if name not in self.hosts:
            raise OSError(-2, "Name or service not known")
        return self.hosts[name]

    def service_port(self, name):
        if name not in self.services:
            raise OSError("unknown service")
        return self.services[name]


# The seed's scripts (kernel-port-forwarding.txt), addresses moved into the lab's ranges.
SEED_PORTFW = """\
# kernel PORTFW for inbound requests

### set up the port forwarding
# the .27 system gets the bulk of the requests because it
# has the new UltraPANTHEON 4692 HTTP co-processor chip
ipmasqadm portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 -p 15
ipmasqadm portfw -a -P tcp -L extip 80 -R 10.16.0.28 80 -p 5

### need masquerading rules too!
ipchains -A -p tcp -s 10.16.0.27/32 80 -j MASQ
ipchains -A -p tcp -s 10.16.0.28/32 80 -j MASQ
"""

SEED_FWMARK = """\
# kernel firewall mark forwarding for Web access
#
# use these symbolic names to keep everything straight
MARK_FRIEND=1
MARK_NEUTRAL=3
FRIEND=203.0.113.0/24
FRIEND_SVR=10.16.0.3/32
NEUTRAL_SVR=10.16.0.46/32

# mark packets as they enter the system
ipchains -I input -s ${FRIEND} -m ${MARK_FRIEND}
ipchains -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}

# establish forward/redir rules based on marks
ipmasqadm mfw -I -m ${MARK_NEUTRAL} -r ${NEUTRAL_SVR}
ipmasqadm mfw -I -m ${MARK_FRIEND} -r ${FRIEND_SVR}

# make sure that the replies are masqueraded too
ipchains -I forward -d ${FRIEND} -s ${FRIEND_SVR} -j MASQ
ipchains -I forward -s ${NEUTRAL_SVR} -j MASQ
"""

SEED_AUTOFW = """\
ipchains -A forward -s 10.16.0.0/24 -j MASQ
ipmasqadm autofw -A -r udp 6970 7170 -h 10.16.0.27 -u
ipmasqadm autofw -A -r udp 8000 8100 -c tcp 554 -u
"""


def translate(text, **options):
    return legacy_import.translate(text, lookup=FakeLookup(), **options)


def document(text, **options):
    return yaml_out.import_document(translate(text, **options))


def run_import(text, *options):
    out, err = io.StringIO(), io.StringIO()
    status = import_export.run_import(list(options) + ["-"], out=out, err=err, stdin=io.StringIO(text),
                                      lookup=FakeLookup())
    return status, out.getvalue(), err.getvalue()


# -- the seed's scripts ---------------------------------------------------------------

SEED_PORTFW_YAML = """\
---
# masqctl import: the gateway role's table variables (roles/gateway); the comments
# above each entry are the script lines that made it.
gateway_portfw:
  # line 6: ipmasqadm portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 -p 15
  # line 7: ipmasqadm portfw -a -P tcp -L extip 80 -R 10.16.0.28 80 -p 5
  - protocol: tcp
    local_address: "198.51.100.1"
    local_port: 80
    backends:
      - {address: "10.16.0.27", port: 80, pref: 15}
      - {address: "10.16.0.28", port: 80, pref: 5}
gateway_masquerade:
  # line 10: ipchains -A -p tcp -s 10.16.0.27/32 80 -j MASQ
  - name: masq-b68453be
    protocol: tcp
    source: "10.16.0.27/32"
    source_ports: [80]
  # line 11: ipchains -A -p tcp -s 10.16.0.28/32 80 -j MASQ
  - name: masq-2a8dc8dc
    protocol: tcp
    source: "10.16.0.28/32"
    source_ports: [80]
"""


def test_seed_portfw_script_exact_yaml():
    assert document(SEED_PORTFW) == SEED_PORTFW_YAML
    assert yaml.safe_load(SEED_PORTFW_YAML) == {
        "gateway_portfw": [{"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
                            "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15},
                                         {"address": "10.16.0.28", "port": 80, "pref": 5}]}],
        "gateway_masquerade": [
            {"name": "masq-b68453be", "protocol": "tcp", "source": "10.16.0.27/32", "source_ports": [80]},
            {"name": "masq-2a8dc8dc", "protocol": "tcp", "source": "10.16.0.28/32", "source_ports": [80]}]}


def test_seed_fwmark_script_insert_order_and_variables():
    data = yaml.safe_load(document(SEED_FWMARK))
    assert list(data) == ["gateway_mfw", "gateway_marks", "gateway_masquerade"]
    # -I puts each new one first: the last line's entry heads the list
    assert [(e["mark"], e.get("source_invert", False)) for e in data["gateway_marks"]] == [(3, True), (1, False)]
    assert data["gateway_mfw"] == [{"mark": 3, "backends": [{"address": "10.16.0.46", "pref": 10}]},
                                   {"mark": 1, "backends": [{"address": "10.16.0.3", "pref": 10}]}]
    assert [e["source"] for e in data["gateway_masquerade"]] == ["10.16.0.46/32", "10.16.0.3/32"]
    assert data["gateway_masquerade"][1]["destination"] == "203.0.113.0/24"
    text = document(SEED_FWMARK)
    assert "  # line 12: ipchains -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}\n  - name: mark3-" in text


def test_seed_autofw_lines():
    data = yaml.safe_load(document(SEED_AUTOFW))
    assert data["gateway_autofw"] == [
        {"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27",
         "timeout": ipmasqadm.AUTOFW_LONG_TIMEOUT},
        {"protocol": "udp", "low_port": 8000, "high_port": 8100, "control_protocol": "tcp", "control_port": 554,
         "timeout": ipmasqadm.AUTOFW_LONG_TIMEOUT}]
    assert data["gateway_masquerade"][0]["source"] == "10.16.0.0/24"


def test_same_input_gives_byte_identical_output():
    for script in (SEED_PORTFW, SEED_FWMARK, SEED_AUTOFW):
        assert run_import(script) == run_import(script)
        assert run_import(script)[0] == 0


def test_only_the_tables_the_script_names_and_flush_gives_an_empty_table():
    data = yaml.safe_load(document("ipmasqadm portfw -f\n"))
    assert data == {"gateway_portfw": []}
    assert document("ipmasqadm portfw -f\n").endswith("gateway_portfw: []\n")


# -- semantics of the ops, as the agent applies them -----------------------------------

def test_delete_edit_and_flush_follow_the_agent():
    script = """\
L=198.51.100.1
ipmasqadm portfw -a -P tcp -L $L 80 -R 10.16.0.27 80 -p 15
ipmasqadm portfw -a -P tcp -L $L 80 -R 10.16.0.28 80
ipmasqadm portfw -d -P tcp -L $L 80 -R 10.16.0.27 80
ipmasqadm portfw -a -P udp -L $L 53 -R 10.16.0.53 53
ipmasqadm mfw -A -m 2 -r 10.16.0.10 443 -p 0
ipmasqadm mfw -A -m 2 -r 10.16.0.11 443 -p 0
ipmasqadm mfw -E -m 2 -p 4
ipmasqadm mfw -A -m 5 -r 10.16.0.12
ipmasqadm mfw -D -m 5
ipmasqadm autofw -A -r udp 7000 7010 -h 10.16.0.27
ipmasqadm autofw -F
"""
    result = translate(script)
    assert result.entries("portfw") == [
        {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
         "backends": [{"address": "10.16.0.28", "port": 80, "pref": 10}]},
        {"protocol": "udp", "local_address": "198.51.100.1", "local_port": 53,
         "backends": [{"address": "10.16.0.53", "port": 53, "pref": 10}]}]
    assert result.entries("mfw") == [{"mark": 2, "backends": [{"address": "10.16.0.10", "port": 443, "pref": 4},
                                                              {"address": "10.16.0.11", "port": 443, "pref": 4}]}]
    assert result.entries("autofw") == []
    # the entry's comments are every line that shaped it
    assert [n for n, _text in result.entry_sources("portfw")[0]] == [2, 3, 4]
    assert [n for n, _text in result.entry_sources("mfw")[0]] == [6, 7, 8]


def test_ipchains_delete_by_criteria_and_flush_by_chain():
    script = """\
ipchains -A input -s 203.0.113.0/24 -m 1
ipchains -A input -s 198.51.100.0/24 -m 2
ipchains -D input -s 203.0.113.0/24 -m 1
ipchains -A forward -s 10.16.0.0/24 -j MASQ
ipchains -F forward
"""
    result = translate(script)
    assert [e["mark"] for e in result.entries("marks")] == [2]
    assert result.entries("masquerade") == []


def test_shell_details():
    script = """\
#!/bin/sh
set -e
export NET="203.0.113.0/24"
LIT='$NET'
ipchains -A input \\
    -s ${NET} -m 7   # trailing comment
masqctl --socket /run/x.sock mark -A input -s "$NET" -p tcp --dport 80,443 -m 8
"""
    result = translate(script)
    marks = [(e["mark"], e["source"]) for e in result.entries("marks")]
    assert marks == [(7, "203.0.113.0/24"), (8, "203.0.113.0/24")]
    assert result.entries("marks")[1]["destination_ports"] == [80, 443]
    assert result.entry_sources("marks")[0] == [(5, "ipchains -A input -s ${NET} -m 7   # trailing comment")]
    # single quotes keep $NET literal, as in the shell
    with pytest.raises(legacy_import.TranslateError) as caught:
        translate("LIT='$NET'\nipchains -A input -s $LIT -m 1\n")
    assert caught.value.line == 2 and "$NET" in caught.value.reason


# -- lines that cannot be translated --------------------------------------------------

@pytest.mark.parametrize("line, reason", [
    ("echo 1 > /proc/sys/net/ipv4/ip_forward", "redirection"),
    ("modprobe ip_masq_ftp", "modprobe: not an ipmasqadm, ipchains or masqctl command"),
    ("ipchains -P forward DENY", "filtering"),
    ("ipchains -A input -s 203.0.113.0/24 -j DENY", "-j DENY"),
    ("ipmasqadm mfw -S -m 3", "mfw -S"),
    ("ipmasqadm portfw -a -P tcp -L $UNSET 80 -R 10.16.0.27 80", "$UNSET is not set"),
    ("ipmasqadm portfw -a -P icmp -L 198.51.100.1 80 -R 10.16.0.27 80", "invalid protocol"),
    ("ipmasqadm portfw -d -P tcp -L 198.51.100.1 81", "no such portfw entry"),
    ("ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80", "already a backend"),
    ("ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 'unclosed", "no closing quotation"),
])
def test_untranslatable_line_exits_2_with_line_number_and_reason(line, reason):
    script = "# first\nipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80\n\n" + line + "\n"
    status, out, err = run_import(script)
    assert status == 2 and out == ""
    assert err.startswith("masqctl import: <stdin>:4: ") and reason in err, err
    assert line in err


def test_skip_unknown_comments_the_line_and_goes_on():
    script = "modprobe ip_masq_ftp\nipchains -P forward DENY\n" + SEED_PORTFW
    status, out, err = run_import(script, "--skip-unknown")
    assert status == 0 and err == ""
    assert "# line 1 not imported (modprobe: not an ipmasqadm, ipchains or masqctl command): " \
           "modprobe ip_masq_ftp\n" in out
    assert "# line 2 not imported" in out
    assert yaml.safe_load(out) == yaml.safe_load(SEED_PORTFW_YAML)


def test_import_through_masqctl_needs_no_agent(tmp_path):
    path = tmp_path / "rc.firewall"
    path.write_text(SEED_FWMARK)
    out, err = io.StringIO(), io.StringIO()

    def no_agent(_path):
        raise AssertionError("import must not contact the agent")

    assert masqctl.run(["--socket", "/nonexistent", "import", str(path)], client_factory=no_agent,
                       out=out, err=err) == 0
    assert out.getvalue() == document(SEED_FWMARK)
    err = io.StringIO()
    assert masqctl.run(["import", str(tmp_path / "missing")], out=io.StringIO(), err=err) == 2
    assert "No such file" in err.getvalue()


def test_yaml_scalars_never_change_type():
    for value in ["yes", "no", "on", "off", "null", "true", "2001:1:2:3:4:5:6:7", "1:20", "10.16.0.27", "0x10",
                  "1e3", "eth0", "-x", "a b", "ppp*", 'q"uote', "#x", "ünï", ""]:
        assert yaml.safe_load("v: %s\n" % yaml_out.scalar(value)) == {"v": value}
    for value in [0, 80, True, False, None]:
        assert yaml.safe_load("v: %s\n" % yaml_out.scalar(value)) == {"v": value}


# -- against the agent: generated scripts ------------------------------------------------

class ServiceClient:
    """masqd.client.Client's interface on an in-process Service."""

    def __init__(self, service):
        self.service = service

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def request(self, op, **arguments):
        envelope = self.service.handle(dict(arguments, op=op))
        if not envelope.get("ok"):
            raise MasqdError.from_envelope(envelope)
        return envelope


def run_like_masqctl(service, argv):
    """What masqctl does with one line; False when the agent refuses it."""
    command = ipmasqadm.parse(argv, lookup=FakeLookup())
    request = command.request
    if command.needs_table:
        current = service.handle({"op": "get", "table": command.needs_table})
        try:
            request = command.finish(current["result"]["entries"], current["revision"])
        except ipmasqadm.StateError:
            return False  # masqctl exits 1 without asking the agent
    return service.handle(request).get("ok", False)


inside = st.integers(2, 60).map(lambda n: "10.16.0.%d" % n)
ports = st.integers(1, 65535)
prefs = st.integers(1, 20)
local = st.sampled_from(["198.51.100.1", "198.51.100.2", "$LOCAL", "${LOCAL}", "extip"])
networks = st.sampled_from(["203.0.113.0/24", "198.51.100.0/24", "10.16.0.0/24", "10.16.0.3/32", "$FRIEND"])


@st.composite
def portfw_line(draw):
    argv = ["portfw", draw(st.sampled_from(["-a", "-d"])), "-P", draw(st.sampled_from(["tcp", "udp"])),
            "-L", draw(local), str(draw(st.sampled_from([80, 443, 8080])))]
    if argv[1] == "-a" or draw(st.booleans()):
        argv += ["-R", draw(inside), str(draw(ports))]
    if argv[1] == "-a" and draw(st.booleans()):
        argv += ["-p", str(draw(prefs))]
    return "ipmasqadm", argv


@st.composite
def mfw_line(draw):
    command = draw(st.sampled_from(["-A", "-I", "-A", "-D", "-E", "-F"]))
    argv = ["mfw", command]
    if command == "-F":
        return "ipmasqadm", argv
    argv += ["-m", str(draw(st.integers(1, 4)))]
    if command in ("-A", "-I") or draw(st.booleans()):
        argv += ["-r", draw(inside) + draw(st.sampled_from(["", "/32"]))]
        if draw(st.booleans()):
            argv.append(str(draw(ports)))
    if command in ("-A", "-I", "-E") and draw(st.booleans()):
        argv += ["-p", str(draw(st.integers(0, 20)))]
    return "ipmasqadm", argv


@st.composite
def autofw_line(draw):
    low = 10000 + 100 * draw(st.integers(0, 5))
    if draw(st.integers(0, 4)) == 0:
        return "ipmasqadm", ["autofw", "-D", "-r", "udp", str(low), str(low + 10)]
    argv = ["autofw", "-A", "-r", draw(st.sampled_from(["udp", "tcp"])), str(low), str(low + draw(st.integers(0, 50)))]
    if draw(st.booleans()):
        argv += ["-h", draw(inside)]
    else:
        argv += ["-c", "tcp", str(draw(st.integers(1, 2000)))]
        if draw(st.booleans()):
            argv.append("--keyed-by-peer")
    argv += draw(st.sampled_from([[], ["-u"], ["-t", "30"]]))
    return "ipmasqadm", argv


@st.composite
def ipchains_line(draw):
    masq = draw(st.booleans())
    argv = [draw(st.sampled_from(["-A", "-I", "-D"])), "forward" if masq else "input"]
    if draw(st.booleans()):
        argv += ["-p", draw(st.sampled_from(["tcp", "udp"]))]
        with_ports = True
    else:
        with_ports = False
    argv += ["-s"] + (["!"] if not masq and draw(st.booleans()) else []) + [draw(networks)]
    if with_ports and draw(st.booleans()):
        argv.append(str(draw(st.sampled_from([80, 53, "1024:65535"]))))
    if draw(st.booleans()):
        argv += ["-d", draw(networks)]
    argv += ["-j", "MASQ"] if masq else ["-m", str(draw(st.integers(1, 4)))]
    return "ipchains", argv


lines = st.lists(st.one_of(portfw_line(), mfw_line(), autofw_line(), ipchains_line()), min_size=1, max_size=14)
VARIABLES = {"LOCAL": "198.51.100.1", "FRIEND": "203.0.113.0/24"}
PREAMBLE = "#!/bin/sh\n# generated\nLOCAL=198.51.100.1\nFRIEND=203.0.113.0/24\n\n"


def masqctl_argv(program, argv):
    """The seed line's masqctl form (the shell's expansion done by hand)."""
    argv = [VARIABLES.get(word.strip("${}"), word) if word.startswith("$") else word for word in argv]
    if program == "ipchains":
        return (["masq"] if "MASQ" in argv else ["mark"]) + argv
    return argv


def fresh_service():
    state = tempfile.mkdtemp(prefix="masqd-import-test-")
    service = Service(state, nft=FakeNftables())
    service.start()
    return service, state


def without_comments(text):
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


@SETTINGS
@given(lines)
def test_generated_scripts_import_to_the_tables_the_agent_holds(drawn):
    service, state = fresh_service()
    try:
        kept = [(program, argv) for program, argv in drawn if run_like_masqctl(service, masqctl_argv(program, argv))]
        script = PREAMBLE + "".join("%s %s\n" % (program, " ".join(argv)) for program, argv in kept)
        result = translate(script)
        tables = service.handle({"op": "get"})["result"]["tables"]
        named = set(result.tables)
        for table in TABLES:
            if table in named:
                assert result.entries(table) == [legacy_import.compact(table, e) for e in tables[table]], table
            else:
                assert tables[table] == [], table
        text = yaml_out.import_document(result)
        assert yaml.safe_load(text) == result.variables()
        # export of the agent is the import, comments aside (tables the script never names: [])
        exported = yaml_out.export_document(tables)
        assert yaml.safe_load(exported) == dict({v: [] for _t, v in legacy_import.TABLE_VARIABLES},
                                                **result.variables())
        # import of an export --script is the export
        rebuilt = yaml_out.import_document(translate(import_export.script(tables)))
        assert without_comments(rebuilt) == without_comments(exported)
        # and the YAML, applied with `set`, gives the agent's tables back
        other, other_state = fresh_service()
        try:
            for table, entries in yaml.safe_load(exported).items():
                table = legacy_import.TABLE_OF_VARIABLE[table]
                assert other.handle({"op": "set", "table": table, "entries": entries})["ok"]
            assert other.handle({"op": "get"})["result"]["tables"] == tables
        finally:
            shutil.rmtree(other_state, ignore_errors=True)
    finally:
        shutil.rmtree(state, ignore_errors=True)


garbage = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c\x1c\x1d"
                                         "\x1e\x85\u2028\u2029"), max_size=40)


@SETTINGS
@given(lines, st.integers(0, 20), garbage,
       st.sampled_from(["frobnicate ", "ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -Z ", "ipchains -P ",
                        "ipmasqadm mfw -S -m 1 ", "ipmasqadm $NOPE "]))
def test_a_garbage_line_exits_2_naming_its_line(drawn, at, noise, prefix):
    service, state = fresh_service()
    try:
        kept = ["%s %s" % (program, " ".join(argv)) for program, argv in drawn
                if run_like_masqctl(service, masqctl_argv(program, argv))]
    finally:
        shutil.rmtree(state, ignore_errors=True)
    at = min(at, len(kept))
    body = kept[:at] + [prefix + noise] + kept[at:]
    script = PREAMBLE + "\n".join(body) + "\n"
    number = PREAMBLE.count("\n") + at + 1
    status, out, err = run_import(script)
    assert status == 2 and out == ""
    assert re.match(r"masqctl import: <stdin>:%d: " % number, err), (number, err)


def test_export_through_masqctl():
    service, state = fresh_service()
    try:
        result = translate(SEED_PORTFW)
        for table in result.tables:
            service.handle({"op": "set", "table": table, "entries": result.entries(table)})
        out, err = io.StringIO(), io.StringIO()
        assert masqctl.run(["export"], client_factory=lambda _path: ServiceClient(service), out=out, err=err) == 0
        assert yaml.safe_load(out.getvalue()) == dict({v: [] for _t, v in legacy_import.TABLE_VARIABLES},
                                                      **yaml.safe_load(SEED_PORTFW_YAML))
        assert "# masqctl export" in out.getvalue()
        out = io.StringIO()
        assert masqctl.run(["export", "--script"], client_factory=lambda _path: ServiceClient(service),
                           out=out, err=err) == 0
        assert "masqctl portfw -a -P tcp -L 198.51.100.1 80 -R 10.16.0.27 80 -p 15\n" in out.getvalue()
        assert masqctl.run(["export", "extra"], client_factory=lambda _path: ServiceClient(service),
                           out=io.StringIO(), err=err) == 2
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_export_without_agent_exits_1():
    err = io.StringIO()
    assert masqctl.run(["--socket", "/nonexistent/masqd.sock", "export"], out=io.StringIO(), err=err) == 1
    assert "masqctl export: masqd is not running" in err.getvalue()


def test_howto_rc_firewall_forms():
    """IP-Masquerade-HOWTO era: programs behind variables with full paths, dotted
    masks, 0/0, -i on the forward chain (output interface), -y on a marking rule."""
    script = """\
#!/bin/sh
IPCHAINS=/sbin/ipchains
IPMASQADM=/usr/sbin/ipmasqadm
EXTIF="eth0"
EXTIP="198.51.100.1"
INTLAN="10.16.0.0/255.255.255.0"
$IPMASQADM portfw -f
$IPCHAINS -F forward
$IPCHAINS -A forward -i $EXTIF -s $INTLAN -d 0/0 -j MASQ
$IPCHAINS -I input -p tcp -y -d $EXTIP/32 8080 -m 2
$IPMASQADM mfw -A -m 2 -r 10.16.0.27 80
$IPMASQADM portfw -a -P tcp -L $EXTIP 25 -R 10.16.0.27 25
"""
    data = yaml.safe_load(document(script))
    assert data["gateway_masquerade"] == [{"name": data["gateway_masquerade"][0]["name"], "source": "10.16.0.0/24",
                                           "output_interface": "eth0"}]
    assert data["gateway_marks"][0]["destination"] == "198.51.100.1/32"
    assert data["gateway_marks"][0]["destination_ports"] == [8080]
    assert data["gateway_mfw"] == [{"mark": 2, "backends": [{"address": "10.16.0.27", "port": 80, "pref": 10}]}]
    assert data["gateway_portfw"][0]["local_port"] == 25
    # the ifconfig | awk idiom is a runtime lookup: refused, and named
    status, _out, err = run_import('EXTIP="`/sbin/ifconfig ppp0 | grep inet`"\n')
    assert status == 2 and "<stdin>:1: command substitution" in err


# -- the second source: iptables-save -------------------------------------------------

IPTABLES_SAVE = """\
# Generated by iptables-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -s 203.0.113.0/24 -j MARK --set-mark 0x1
-A PREROUTING ! -s 203.0.113.0/24 -j MARK --set-xmark 0x3/0xffffffff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -m statistic --mode nth --every 2 --packet 0 \
-j DNAT --to-destination 10.16.0.27:80
-A PREROUTING -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.16.0.28:80
-A PREROUTING -d 198.51.100.1/32 -p udp -m udp --dport 53 -j DNAT --to-destination 10.16.0.53
-A PREROUTING -m mark --mark 0x3 -j DNAT --to-destination 10.16.0.46
-A PREROUTING -m mark --mark 0x1 -j DNAT --to-destination 10.16.0.3
-A POSTROUTING -s 10.16.0.0/24 -o eth0 -m comment --comment inside-out -j MASQUERADE
-A POSTROUTING -s 10.16.0.3/32 -d 203.0.113.0/24 -p tcp -m multiport --dports 80,443 -j MASQUERADE
COMMIT
"""


def test_iptables_save_maps_dnat_masquerade_and_mark_rules():
    data = yaml.safe_load(document(IPTABLES_SAVE))
    assert data["gateway_portfw"] == [
        {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
         "backends": [{"address": "10.16.0.27", "port": 80, "pref": 1}, {"address": "10.16.0.28", "port": 80, "pref": 1}]},
        {"protocol": "udp", "local_address": "198.51.100.1", "local_port": 53,
         "backends": [{"address": "10.16.0.53", "port": 53, "pref": 10}]}]
    assert data["gateway_mfw"] == [{"mark": 3, "backends": [{"address": "10.16.0.46", "pref": 10}]},
                                   {"mark": 1, "backends": [{"address": "10.16.0.3", "pref": 10}]}]
    # MARK is not terminal (the last match wins); masqd's marks are first-match: reversed.
    # The rules are the seed's FWMARK classifiers, so they get the same names.
    seed = yaml.safe_load(document(SEED_FWMARK))
    assert data["gateway_marks"] == seed["gateway_marks"]
    assert data["gateway_masquerade"][0] == {"name": "inside-out", "source": "10.16.0.0/24",
                                             "output_interface": "eth0"}
    assert data["gateway_masquerade"][1]["destination_ports"] == [80, 443]
    assert "# line 10: -A PREROUTING -d 198.51.100.1/32" in document(IPTABLES_SAVE)


@pytest.mark.parametrize("rule, reason", [
    ("*filter\n-A FORWARD -s 10.16.0.0/24 -j ACCEPT", "only the nat and mangle tables"),
    ("*nat\n-A POSTROUTING -s 10.16.0.0/24 -j SNAT --to-source 198.51.100.1", "no masqd table"),
    ("*nat\n-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.16.0.27", "PORTFW needs -d ADDR"),
    ("*nat\n-A PREROUTING -d 198.51.100.1 -s 203.0.113.0/24 -p tcp --dport 80 -j DNAT --to-destination 10.16.0.27",
     "-s, --sport and -i have no equivalent"),
    ("*nat\n-A PREROUTING -d 198.51.100.1 -p tcp --dport 80 -j DNAT --to-destination 10.16.0.27\n"
     "-A PREROUTING -d 198.51.100.1 -p tcp --dport 80 -j DNAT --to-destination 10.16.0.28", "never reached"),
    ("*nat\n-A PREROUTING -d 198.51.100.1 -p tcp --dport 80 -m statistic --mode random --probability 0.5 "
     "-j DNAT --to-destination 10.16.0.27", "round-robin idiom"),
    ("*mangle\n-A PREROUTING -s 203.0.113.0/24 -j MARK --set-xmark 0x1/0xff", "changes bits"),
    ("*mangle\n-A PREROUTING -m conntrack --ctstate NEW -j MARK --set-mark 1", "-m conntrack"),
])
def test_iptables_save_rules_without_equivalent_exit_2(rule, reason):
    status, out, err = run_import("# iptables-save\n" + rule + "\nCOMMIT\n")
    assert status == 2 and out == ""
    number = 1 + rule.count("\n") + 1
    assert err.startswith("masqctl import: <stdin>:%d: " % number) and reason in err, err


def test_iptables_save_skip_unknown_and_parsed_reads_it_too():
    text = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n" + IPTABLES_SAVE
    result = translate(text, skip_unknown=True)
    assert [number for number, _line, _reason in result.skipped] == [3]
    assert [e["mark"] for e in result.entries("mfw")] == [3, 1]


# -- the third source: nft list ruleset ------------------------------------------------

# `nft list ruleset` of a hand-written nftables gateway (the same intent as IPTABLES_SAVE),
# printed by nft itself, plus masqd's own table (skipped) and a filter table without rules.
NFT_RULESET = """\
table ip nat {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr 198.51.100.1 tcp dport 80 counter packets 0 bytes 0 dnat to numgen inc mod 2 map { 0 : 10.16.0.27, 1 : 10.16.0.28 }
\t\tip daddr 198.51.100.1 udp dport 53 dnat to 10.16.0.53
\t\tip daddr 198.51.100.1 tcp dport 8080 dnat to 10.16.0.27:80
\t\tmeta mark 0x00000003 dnat to 10.16.0.46
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.16.0.0/24 oifname "eth0" masquerade comment "inside-out"
\t\tip saddr 10.16.0.3 ip daddr 203.0.113.0/24 tcp dport { 80, 443 } masquerade
\t}
}
table ip mangle {
\tchain prerouting {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tip saddr 203.0.113.0/24 meta mark set 0x00000001
\t\tip saddr != 203.0.113.0/24 meta mark set 0x00000003
\t\tiifname "eth2" tcp dport 1024-65535 meta mark set 0x00000005
\t}
}
table inet masqd {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr 198.51.100.9 tcp dport 9 dnat to 10.16.0.9
\t}
}
table inet filter {
\tset friends {
\t\ttype ipv4_addr
\t\telements = { 203.0.113.1, 203.0.113.2 }
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t}
}
"""


def test_nft_ruleset_maps_by_hook_and_skips_masqds_own_table():
    data = yaml.safe_load(document(NFT_RULESET))
    assert data["gateway_portfw"][0] == {
        "protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
        "backends": [{"address": "10.16.0.27", "port": 80, "pref": 1}, {"address": "10.16.0.28", "port": 80, "pref": 1}]}
    assert data["gateway_portfw"][2]["backends"] == [{"address": "10.16.0.27", "port": 80, "pref": 10}]
    assert "198.51.100.9" not in document(NFT_RULESET)
    assert data["gateway_mfw"] == [{"mark": 3, "backends": [{"address": "10.16.0.46", "pref": 10}]}]
    # meta mark set is not terminal: last match wins, imported reversed; the seed's
    # classifiers get the same names as from ipchains and iptables-save
    assert data["gateway_marks"][1:] == yaml.safe_load(document(SEED_FWMARK))["gateway_marks"]
    assert data["gateway_marks"][0]["destination_ports"] == ["1024-65535"]
    assert data["gateway_masquerade"][0]["name"] == "inside-out"
    assert data["gateway_masquerade"][1]["destination_ports"] == [80, 443]
    # one comment per source line, even when a line adds several backends
    assert document(NFT_RULESET).count("# line 4: ") == 1


@pytest.mark.parametrize("rule, reason", [
    ("ip daddr 198.51.100.1 tcp dport 80 accept", "accept: no masqd equivalent"),
    ("ip saddr @friends dnat to 10.16.0.27", "named sets"),
    ("ct state new dnat to 10.16.0.27", "ct: no masqd equivalent"),
    ("ip daddr 198.51.100.1 tcp dport != 80 dnat to 10.16.0.27", "only addresses can be inverted"),
    ("ip daddr 198.51.100.1 tcp dport 80 dnat to numgen inc mod 3 map { 0 : 10.16.0.27, 1 : 10.16.0.28 }",
     "exactly the keys 0..2"),
])
def test_nft_rules_without_equivalent_exit_2(rule, reason):
    text = ("table ip nat {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
            "\t\t%s\n\t}\n}\n" % rule)
    status, out, err = run_import(text)
    assert status == 2 and out == ""
    assert err.startswith("masqctl import: <stdin>:4: ") and reason in err, err


def test_nft_rule_in_a_regular_chain_is_refused():
    text = "table ip nat {\n\tchain web {\n\t\tip daddr 198.51.100.1 tcp dport 80 dnat to 10.16.0.27\n\t}\n}\n"
    status, _out, err = run_import(text)
    assert status == 2 and "<stdin>:3: a rule in a regular chain" in err
