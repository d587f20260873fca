"""The seed's ipmasqadm/ipchains command lines -> the exact masqd API requests."""

import subprocess

import pytest

from masqd.ipmasqadm import (AUTOFW_LONG_TIMEOUT, AUTOFW_USAGE, MFW_USAGE, PORTFW_USAGE,
                             StateError, UsageError, parse)


class FakeLookup:
    """/etc/hosts and /etc/services for the tests: nothing leaves the process."""

    hosts = {"extip": "198.51.100.1", "web1": "10.16.0.27"}
    services = {"www": 80, "http": 80, "ssh": 22}

    def host_address(self, name):
        if name not in self.hosts:
            raise OSError(-2, "Name or service not known")
        return self.hosts[name]

    def service_port(self, name):
        if name not in self.services:
            raise OSError("unknown service")
        return self.services[name]


def request(line):
    command = parse(line.split(), lookup=FakeLookup())
    assert command.help is None and command.listing is None, command
    return command.request


def usage_error(line):
    with pytest.raises(UsageError) as caught:
        parse(line.split(), lookup=FakeLookup())
    return caught.value


# -- autofw: the seed's two usage lines, -D, -F, and the bare module ----------------------

def test_autofw_hidden_host_line():
    # ipmasqadm autofw -A -r proto lport hport -h ipaddr -u
    assert request("autofw -A -r udp 6970 7170 -h 10.16.0.27 -u") == {
        "op": "add", "table": "autofw",
        "entry": {"protocol": "udp", "low_port": 6970, "high_port": 7170,
                  "hidden_host": "10.16.0.27", "timeout": AUTOFW_LONG_TIMEOUT}}


def test_autofw_control_port_line():
    # ipmasqadm autofw -A -r proto lport hport -c proto port -u
    assert request("autofw -A -r udp 6970 7170 -c tcp 7070 -u") == {
        "op": "add", "table": "autofw",
        "entry": {"protocol": "udp", "low_port": 6970, "high_port": 7170,
                  "control_protocol": "tcp", "control_port": 7070, "timeout": AUTOFW_LONG_TIMEOUT}}


def test_autofw_without_u_leaves_the_default_timeout_to_the_agent():
    assert request("autofw -A -r tcp 2000 2010 -h web1")["entry"] == {
        "protocol": "tcp", "low_port": 2000, "high_port": 2010, "hidden_host": "10.16.0.27"}
    assert request("autofw -A -r tcp 2000 2010 -h web1 -t 40")["entry"]["timeout"] == 40


def test_autofw_delete_and_flush():
    assert request("autofw -D -r udp 6970 7170 -h 10.16.0.27") == {
        "op": "delete", "table": "autofw",
        "entry": {"protocol": "udp", "low_port": 6970, "high_port": 7170}}
    assert request("autofw -F") == {"op": "flush", "table": "autofw"}


def test_autofw_without_arguments_prints_the_ipautofw_usage():
    command = parse(["autofw"])
    assert command.help == AUTOFW_USAGE
    assert command.help.startswith("Usage:\n    ipautofw <command> <options>\n\nValid commands:\n"
                                   "    -A                           add new autoforward entry\n")


def test_autofw_list_and_verbose():
    command = parse("autofw -L -n".split())
    assert (command.listing, command.numeric) == ("autofw", True)
    command = parse("autofw -A -r udp 6970 7170 -c tcp 7070 -v".split())
    assert command.verbose == "Adding autofwd udp ports 6970 - 7170 via tcp ctl port 7070"


@pytest.mark.parametrize("line, message", [
    ("autofw -A -r udp 6970 7170", "either -h <host> or -c"),
    ("autofw -A -r udp 6970 7170 -h 10.16.0.27 -c tcp 7070", "either -h <host> or -c"),
    ("autofw -A -h 10.16.0.27", "type of forwarding"),
    ("autofw -F -r udp 1 2", "flush command does not take options"),
    ("autofw -A -r icmp 1 2 -h 10.16.0.27", "invalid protocol 'icmp'"),
    ("autofw -A -r udp low 7170 -h 10.16.0.27", "'low' is not a number"),
    ("autofw -A -r udp 6970", "option -r needs"),
    ("autofw -A -p udp 1 10.16.0.27:2", "-p of ipautofw is not supported"),
    ("autofw -r udp 1 2 -h 10.16.0.27", "Command must be either -A, -D, or -F"),
    ("autofw -A -D -r udp 1 2", "multiple commands"),
    ("autofw -A -r udp 1 2 -h 10.16.0.27 -x", "Invalid option: -x"),
])
def test_autofw_usage_errors(line, message):
    error = usage_error(line)
    assert message in error.message
    assert error.usage == AUTOFW_USAGE


# -- portfw: every usage line and the seed's example script ------------------------------

def test_portfw_seed_example_lines():
    # ipmasqadm portfw -a -P tcp -L extip 80 -R 192.168.16.27 80 -p 15
    assert request("portfw -a -P tcp -L extip 80 -R 192.168.16.27 80 -p 15") == {
        "op": "add", "table": "portfw",
        "entry": {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
                  "backends": [{"address": "192.168.16.27", "port": 80, "pref": 15}]}}
    assert request("portfw -a -P tcp -L extip 80 -R 192.168.16.28 80 -p 5")["entry"]["backends"] == [
        {"address": "192.168.16.28", "port": 80, "pref": 5}]


def test_portfw_add_without_pref_leaves_the_default_to_the_agent():
    assert request("portfw -a -P udp -L 198.51.100.1 53 -R 10.16.0.27 5353")["entry"] == {
        "protocol": "udp", "local_address": "198.51.100.1", "local_port": 53,
        "backends": [{"address": "10.16.0.27", "port": 5353}]}


def test_portfw_service_names_and_getopt_bundles():
    assert request("portfw -a -Ptcp -L extip www -R web1 http -p15")["entry"] == {
        "protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
        "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15}]}


def test_portfw_delete_key_or_one_backend():
    # portfw -d -P PROTO -L LADDR LPORT [-R RADDR RPORT]
    assert request("portfw -d -P tcp -L extip 80") == {
        "op": "delete", "table": "portfw",
        "entry": {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80}}
    assert request("portfw -d -P tcp -L extip 80 -R 192.168.16.28 80") == {
        "op": "delete", "table": "portfw",
        "entry": {"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
                  "backends": [{"address": "192.168.16.28", "port": 80}]}}


def test_portfw_flush_list_numeric_help():
    assert request("portfw -f") == {"op": "flush", "table": "portfw"}
    listing = parse(["portfw", "-l"])
    assert (listing.listing, listing.numeric) == ("portfw", False)
    for line in ("portfw -l -n", "portfw -n -l", "portfw -ln"):
        command = parse(line.split())
        assert (command.listing, command.numeric) == ("portfw", True)
    assert parse("portfw -h".split()).help == PORTFW_USAGE


def test_portfw_n_refuses_names_when_adding():
    # ipmasqadm with -n did no lookups at all: a name is an illegal address
    error = usage_error("portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 -n")
    assert "-L LADDR: 'extip' is not an IP address" in error.message


@pytest.mark.parametrize("line, message", [
    ("portfw -n", "no command given"),
    ("portfw -a -P tcp -L extip 80", "insufficient options"),
    ("portfw -a -L extip 80 -R 10.16.0.27 80", "insufficient options"),
    ("portfw -d -P tcp", "insufficient options"),
    ("portfw -a -d -P tcp -L extip 80", "multiple commands"),
    ("portfw -f -P tcp", "incompatible options"),
    ("portfw -l -L extip 80", "incompatible options"),
    ("portfw -d -P tcp -L extip 80 -p 3", "-p PREF is for -a"),
    ("portfw -a -P icmp -L extip 80 -R 10.16.0.27 80", "invalid protocol 'icmp'"),
    ("portfw -a -P tcp -P udp -L extip 80 -R 10.16.0.27 80", "multiple protocols"),
    ("portfw -a -P tcp -L extip -R 10.16.0.27 80", "option -L needs"),
    ("portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 -p many", "'many' is not a number"),
    ("portfw -a -P tcp -L extip 80 -R 10.16.0.27 nosuchsvc", "unknown service name 'nosuchsvc'"),
    ("portfw -a -P tcp -L extip 80 -R 10.16.0.27 80 junk", "unknown arguments"),
    ("portfw -x", "invalid option -x"),
])
def test_portfw_usage_errors(line, message):
    error = usage_error(line)
    assert message in error.message


def test_unresolvable_name_is_named_in_the_error():
    error = usage_error("portfw -a -P tcp -L nosuchhost 80 -R 10.16.0.27 80")
    assert error.message == "-L LADDR: cannot resolve host name 'nosuchhost': Name or service not known"
    assert error.usage == ""  # not a syntax error: no usage text


# -- mfw: every usage line and the seed's FWMARK script -----------------------------------

def test_mfw_seed_script_lines_without_rport():
    # ipmasqadm mfw -I -m ${MARK_NEUTRAL} -r ${NEUTRAL_SVR}  (NEUTRAL_SVR=192.168.15.46/32)
    assert request("mfw -I -m 3 -r 192.168.15.46/32") == {
        "op": "insert", "table": "mfw",
        "entry": {"mark": 3, "backends": [{"address": "192.168.15.46", "port": None}]}}
    assert request("mfw -I -m 1 -r 192.168.17.3/32") == {
        "op": "insert", "table": "mfw",
        "entry": {"mark": 1, "backends": [{"address": "192.168.17.3", "port": None}]}}


def test_mfw_add_with_port_and_pref():
    # mfw -A -m FWMARK -r RADDR RPORT [-p PREF]
    assert request("mfw -A -m 1 -r 10.16.0.3 80 -p 0") == {
        "op": "add", "table": "mfw",
        "entry": {"mark": 1, "backends": [{"address": "10.16.0.3", "port": 80, "pref": 0}]}}
    assert request("mfw -A -m 1 -r web1 www")["entry"]["backends"] == [{"address": "10.16.0.27", "port": 80}]
    assert request("mfw -A -m 2 -r 2001:db8::5/128 -p 5")["entry"]["backends"] == [
        {"address": "2001:db8::5", "port": None, "pref": 5}]


def test_mfw_delete_edit_schedule_flush_list():
    # mfw -D -m FWMARK [-r RADDR RPORT]
    assert request("mfw -D -m 1") == {"op": "delete", "table": "mfw", "entry": {"mark": 1}}
    assert request("mfw -D -m 1 -r 10.16.0.3 80") == {
        "op": "delete", "table": "mfw",
        "entry": {"mark": 1, "backends": [{"address": "10.16.0.3", "port": 80}]}}
    # mfw -E -m FWMARK [-r RADDR RPORT] -p PREF
    assert request("mfw -E -m 1 -r 10.16.0.3 80 -p 0") == {
        "op": "edit", "table": "mfw",
        "entry": {"mark": 1, "backends": [{"address": "10.16.0.3", "port": 80, "pref": 0}]}}
    # the seed's usage line has no -p: ipmasqadm then sent its default pref 10
    assert request("mfw -E -m 1 -r 10.16.0.3") == {
        "op": "edit", "table": "mfw",
        "entry": {"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 10}]}}
    # mfw -S -m FWMARK
    assert request("mfw -S -m 1") == {"op": "schedule", "mark": 1}
    assert request("mfw -F") == {"op": "flush", "table": "mfw"}
    for line, numeric in (("mfw -L", False), ("mfw -L -n", True), ("mfw -Ln", True)):
        command = parse(line.split())
        assert (command.listing, command.numeric) == ("mfw", numeric)
    assert parse("mfw -h".split()).help == MFW_USAGE


def test_mfw_edit_without_raddr_sets_every_backend_of_the_mark():
    command = parse("mfw -E -m 1 -p 0".split())
    assert command.request is None and command.needs_table == "mfw"
    current = [{"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 10, "pcnt": 4},
                                        {"address": "10.16.0.46", "port": None, "pref": 5}]},
               {"mark": 2, "backends": [{"address": "10.16.0.9", "port": 22, "pref": 10}]}]
    assert command.finish(current, 9) == {
        "op": "edit", "table": "mfw",
        "entry": {"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 0},
                                          {"address": "10.16.0.46", "port": None, "pref": 0}]}}
    with pytest.raises(StateError, match="fwmark 1 has no entries"):
        command.finish(current[1:], 9)


@pytest.mark.parametrize("line, message", [
    ("mfw -n", "no command given"),
    ("mfw -A -r 10.16.0.3", "-m FWMARK"),
    ("mfw -A -m 1", "-r RADDR"),
    ("mfw -S -m 1 -r 10.16.0.3", "-S takes only -m"),
    ("mfw -F -m 1", "incompatible options"),
    ("mfw -A -m 1 -r 10.16.0.0/24", "'10.16.0.0/24' is a network"),
    ("mfw -A -m one -r 10.16.0.3", "'one' is not a number"),
    ("mfw -A -I -m 1 -r 10.16.0.3", "multiple commands"),
    ("mfw -A -m 1 -r 10.16.0.3 -r 10.16.0.4", "multiple destinations"),
    ("mfw -D -m 1 -p 4", "-p PREF is for"),
])
def test_mfw_usage_errors(line, message):
    assert message in usage_error(line).message


# -- mark and masq: the seed's ipchains lines ---------------------------------------------

def test_mark_lines_of_the_fwmark_script():
    # ipchains -I input -s ${FRIEND} -m ${MARK_FRIEND}
    friend = parse("mark -I input -s 209.81.8.0/24 -m 1".split())
    assert friend.needs_table == "marks"
    existing = [{"name": "old", "mark": 7, "source": "10.0.0.0/8"}]
    new = friend.finish(existing, 4)
    assert new["op"] == "set" and new["revision"] == 4 and new["table"] == "marks"
    assert new["entries"][1:] == existing
    assert {k: v for k, v in new["entries"][0].items() if k != "name"} == {
        "mark": 1, "source": "209.81.8.0/24"}
    assert new["entries"][0]["name"].startswith("mark1-")
    # ipchains -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}
    neutral = parse("mark -I input -s ! 209.81.8.0/24 -m 3".split()).finish([], 5)["entries"][0]
    assert {k: v for k, v in neutral.items() if k != "name"} == {
        "mark": 3, "source": "209.81.8.0/24", "source_invert": True}
    assert neutral["name"] != new["entries"][0]["name"]


def test_mark_append_with_every_criterion():
    assert request("mark -A input --name friendweb -p tcp -s 203.0.113.0/255.255.255.0 1024:65535 "
                   "-d extip www -i veth0 -m 0x10") == {
        "op": "add", "table": "marks",
        "entry": {"name": "friendweb", "protocol": "tcp", "source": "203.0.113.0/24",
                  "source_ports": ["1024-65535"], "destination": "198.51.100.1",
                  "destination_ports": [80], "input_interface": "veth0", "mark": 16}}
    assert request("mark -A -p udp --sport 53 --dport 6000-6010,7000,:1023 -m 2")["entry"] == {
        "name": request("mark -A -p udp --sport 53 --dport 6000-6010,7000,:1023 -m 2")["entry"]["name"],
        "protocol": "udp", "source_ports": [53], "destination_ports": ["6000-6010", 7000, "1-1023"],
        "mark": 2}


def test_generated_names_are_stable_and_given_names_win():
    first = request("mark -A -s 203.0.113.0/24 -m 1")["entry"]["name"]
    assert first == request("mark -A -s 203.0.113.0/24 -m 1")["entry"]["name"]
    assert first != request("mark -A -s 203.0.113.0/24 -m 2")["entry"]["name"]
    assert request("mark -A -s 203.0.113.0/24 -m 1 --name friend")["entry"]["name"] == "friend"


def test_host_bits_are_masked_off_like_ipchains():
    assert request("mark -A -s 203.0.113.10/24 -m 1")["entry"]["source"] == "203.0.113.0/24"
    assert request("masq -A -d web1/255.255.0.0")["entry"]["destination"] == "10.16.0.0/16"


def test_mark_delete_by_name_by_criteria_flush_list():
    assert request("mark -D input friend") == {"op": "delete", "table": "marks", "entry": {"name": "friend"}}
    assert request("mark -D --name friend") == {"op": "delete", "table": "marks", "entry": {"name": "friend"}}
    command = parse("mark -D input -s ! 203.0.113.0/24 -m 3".split())
    current = [
        {"name": "friend", "mark": 1, "protocol": None, "source": "203.0.113.0/24", "source_invert": False,
         "destination": None, "destination_invert": False, "source_ports": None,
         "destination_ports": None, "input_interface": None},
        {"name": "neutral", "mark": 3, "protocol": None, "source": "203.0.113.0/24", "source_invert": True,
         "destination": None, "destination_invert": False, "source_ports": None,
         "destination_ports": None, "input_interface": None}]
    assert command.finish(current, 1) == {"op": "delete", "table": "marks", "entry": {"name": "neutral"}}
    with pytest.raises(StateError, match="no rule matches"):
        command.finish(current[:1], 1)
    assert request("mark -F") == {"op": "flush", "table": "marks"}
    command = parse("mark -L -n".split())
    assert (command.listing, command.numeric) == ("marks", True)


def test_masq_lines_of_the_seed():
    # ipchains -A -p tcp -s 192.168.16.27/32 80 -j MASQ  (address then port)
    entry = request("masq -A -p tcp -s 192.168.16.27/32 80 -j MASQ")["entry"]
    assert {k: v for k, v in entry.items() if k != "name"} == {
        "protocol": "tcp", "source": "192.168.16.27/32", "source_ports": [80]}
    assert entry["name"].startswith("masq-")
    # ipchains -I forward -d ${FRIEND} -s ${FRIEND_SVR} -j MASQ
    command = parse("masq -I forward -d 209.81.8.0/24 -s 192.168.17.3/32 -j MASQ".split())
    first = command.finish([{"name": "x"}], 2)
    assert first["op"] == "set" and first["revision"] == 2 and first["entries"][1] == {"name": "x"}
    assert {k: v for k, v in first["entries"][0].items() if k != "name"} == {
        "destination": "209.81.8.0/24", "source": "192.168.17.3/32"}
    # ipchains -I forward -s ${NEUTRAL_SVR} -j MASQ
    only = parse("masq -I forward -s 192.168.15.46/32 -j MASQ".split()).finish([], 3)["entries"]
    assert [{k: v for k, v in e.items() if k != "name"} for e in only] == [{"source": "192.168.15.46/32"}]


def test_masq_interface_flush_delete():
    assert request("masq -A --name out -o veth1 -j MASQ") == {
        "op": "add", "table": "masquerade", "entry": {"name": "out", "output_interface": "veth1"}}
    assert request("masq -F") == {"op": "flush", "table": "masquerade"}
    assert request("masq -D forward web-replies") == {
        "op": "delete", "table": "masquerade", "entry": {"name": "web-replies"}}


@pytest.mark.parametrize("line, message", [
    ("mark -A -s 203.0.113.0/24", "-m MARK"),
    ("mark -A output -s 203.0.113.0/24 -m 1", "chain 'output'"),
    ("mark -A -p ! tcp -m 1", "protocol inversion"),
    ("mark -A -s 203.0.113.0/24 ! 80 -m 1", "port inversion"),
    ("mark -A -p gre -m 1", "invalid protocol 'gre'"),
    ("mark -A -s 203.0.113.0/33 -m 1", "invalid network"),
    ("mark -A -m x1", "'x1' is not a number"),
    ("mark -A -s nosuchhost -m 1", "cannot resolve host name 'nosuchhost'"),
    ("mark -D --name a -s 203.0.113.0/24", "either by NAME or by criteria"),
    ("mark -D", "insufficient options"),
    ("mark -F -m 1", "incompatible options"),
    ("masq -A -s 10.16.0.27 -j ACCEPT", "only -j MASQ"),
    ("masq -A -s 10.16.0.27 -m 1", "invalid option -m"),
    ("masq -A -s 10.16.0.27 80 extra", "unknown arguments"),
    ("masq -A -s 10.16.0.27 extra", "unknown service name 'extra'"),
    ("masq -n", "no command given"),
])
def test_rule_usage_errors(line, message):
    assert message in usage_error(line).message


def test_a_bare_module_prints_its_usage_like_ipmasqadm():
    assert parse(["portfw"]).help == PORTFW_USAGE
    assert parse(["mfw"]).help == MFW_USAGE
    assert parse(["mark"]).help.startswith("Usage: mark -A")


def test_unknown_module():
    error = usage_error("ipportfw -a")
    assert "unknown module 'ipportfw'" in error.message


# -- the seed's scripts, expanded by a real shell, every masqctl line parses -----------------

FWMARK_SCRIPT = r'''
MARK_FRIEND=1
MARK_NEUTRAL=3
FRIEND=209.81.8.0/24
FRIEND_SVR=192.168.17.3/32
NEUTRAL_SVR=192.168.15.46/32

# mark packets as they enter the system
masqctl mark -I input -s ${FRIEND} -m ${MARK_FRIEND}
masqctl mark -I input -s ! ${FRIEND} -m ${MARK_NEUTRAL}

# establish forward/redir rules based on marks
masqctl mfw -I -m ${MARK_NEUTRAL} -r ${NEUTRAL_SVR}
masqctl mfw -I -m ${MARK_FRIEND} -r ${FRIEND_SVR}

# make sure that the replies are masqueraded too
masqctl masq -I forward -d ${FRIEND} -s ${FRIEND_SVR} -j MASQ
masqctl masq -I forward -s ${NEUTRAL_SVR} -j MASQ
'''

PORTFW_SCRIPT = r'''
masqctl portfw -a -P tcp -L extip 80 -R 192.168.16.27 80 -p 15
masqctl portfw -a -P tcp -L extip 80 -R 192.168.16.28 80 -p 5
masqctl masq -A -p tcp -s 192.168.16.27/32 80 -j MASQ
masqctl masq -A -p tcp -s 192.168.16.28/32 80 -j MASQ
'''


def shell_lines(script):
    """argv of every masqctl call the script makes, as bash expands them."""
    recorder = "masqctl() { for a in \"$@\"; do printf '%s\\037' \"$a\"; done; printf '\\n'; }\n"
    out = subprocess.run(["bash", "-c", recorder + script], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return [line.rstrip("\x1f").split("\x1f") for line in out.splitlines()]


def test_fwmark_script_expands_to_the_expected_commands():
    lines = shell_lines(FWMARK_SCRIPT)
    assert lines[1] == ["mark", "-I", "input", "-s", "!", "209.81.8.0/24", "-m", "3"]
    commands = [parse(argv, lookup=FakeLookup()) for argv in lines]
    assert [c.request["op"] if c.request else c.finish([], 1)["op"] for c in commands] == [
        "set", "set", "insert", "insert", "set", "set"]
    assert commands[2].request["entry"] == {"mark": 3, "backends": [{"address": "192.168.15.46", "port": None}]}


def test_portfw_script_expands_to_the_expected_commands():
    commands = [parse(argv, lookup=FakeLookup()) for argv in shell_lines(PORTFW_SCRIPT)]
    assert [c.request["op"] for c in commands] == ["add", "add", "add", "add"]
    assert [b["pref"] for c in commands[:2] for b in c.request["entry"]["backends"]] == [15, 5]
    assert [c.request["entry"]["source"] for c in commands[2:]] == ["192.168.16.27/32", "192.168.16.28/32"]
