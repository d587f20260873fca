"""Text listings: ipmasqadm's column layout, names unless -n."""

from masqd.listing import Names, format_autofw, format_marks, format_masquerade, format_mfw, \
    format_portfw, format_status

HOSTS = {"198.51.100.1": "extip", "10.16.0.27": "web1"}
SERVICES = {(80, "tcp"): "http"}


def names(numeric=False):
    def host(address):
        if address not in HOSTS:
            raise OSError("unknown host")
        return HOSTS[address]

    def service(port, protocol):
        if (port, protocol) not in SERVICES:
            raise OSError("unknown port")
        return SERVICES[(port, protocol)]
    return Names(numeric, host_name=host, service_name=service)


PORTFW = [{"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
           "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15, "pcnt": 12, "connections": 3},
                        {"address": "10.16.0.28", "port": 8080, "pref": 5, "pcnt": 5, "connections": 0}]}]


def test_portfw_listing_is_ipmasqadm_portfw_l():
    assert format_portfw(PORTFW, names(numeric=True)) == (
        "prot localaddr            rediraddr               lport    rport  pcnt  pref\n"
        "TCP  198.51.100.1         10.16.0.27                 80       80    12    15\n"
        "TCP  198.51.100.1         10.16.0.28                 80     8080     5     5\n")


def test_portfw_listing_shows_names_without_n():
    lines = format_portfw(PORTFW, names()).splitlines()
    assert lines[1].split() == ["TCP", "extip", "web1", "http", "http", "12", "15"]
    assert lines[2].split() == ["TCP", "extip", "10.16.0.28", "http", "8080", "5", "5"]


def test_pcnt_falls_back_to_pref_when_the_agent_has_no_counter():
    entry = [{"protocol": "udp", "local_address": "198.51.100.1", "local_port": 53,
              "backends": [{"address": "10.16.0.27", "port": 53, "pref": 10}]}]
    assert format_portfw(entry, names(True)).splitlines()[1].split()[-2:] == ["10", "10"]


def test_mfw_listing_is_ipmasqadm_mfw_l():
    entries = [{"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 0, "pcnt": 0}]},
               {"mark": 3, "backends": [{"address": "10.16.0.27", "port": 80, "pref": 10, "pcnt": 7}]}]
    assert format_mfw(entries, names(True)) == (
        "fwmark   rediraddr               rport  pcnt  pref\n"
        "1        10.16.0.3                 any     0     0\n"
        "3        10.16.0.27                 80     7    10\n")
    assert format_mfw(entries, names()).splitlines()[2].split() == ["3", "web1", "http", "7", "10"]


def test_autofw_listing():
    entries = [{"protocol": "udp", "low_port": 6970, "high_port": 7170, "hidden_host": "10.16.0.27",
                "timeout": 15},
               {"protocol": "udp", "low_port": 7000, "high_port": 7010, "control_protocol": "tcp",
                "control_port": 80, "timeout": 3600, "recipient": "10.16.0.28"}]
    assert format_autofw(entries, names(True)) == (
        "prot   low  high forward to           timeout  recipient\n"
        "UDP   6970  7170 host 10.16.0.27           15  -\n"
        "UDP   7000  7010 ctl tcp/80              3600  10.16.0.28\n")
    entries[1].update(recipient=None, status="inactive: control-port detection not yet implemented")
    assert format_autofw(entries, names(True)).splitlines()[2].endswith("3600  - (inactive)")
    assert "host web1" in format_autofw(entries, names())
    assert "ctl tcp/http" in format_autofw(entries, names())


def test_marks_and_masquerade_listings():
    marks = [{"name": "friend", "mark": 1, "protocol": None, "source": "203.0.113.0/24",
              "source_invert": False, "destination": None, "destination_invert": False,
              "source_ports": None, "destination_ports": None, "input_interface": None},
             {"name": "neutral", "mark": 3, "protocol": "tcp", "source": "203.0.113.0/24",
              "source_invert": True, "destination": "198.51.100.1/32", "destination_invert": False,
              "source_ports": None, "destination_ports": [80, "6000-6010"], "input_interface": "veth0"}]
    text = format_marks(marks, names(True)).splitlines()
    assert text[0].split() == ["name", "mark", "prot", "source", "destination", "sports", "dports", "iface"]
    assert text[1].split() == ["friend", "1", "all", "203.0.113.0/24", "anywhere", "any", "any", "any"]
    assert text[2].split() == ["neutral", "3", "tcp", "!203.0.113.0/24", "198.51.100.1", "any",
                               "80,6000-6010", "veth0"]
    # names only for single hosts, like ipchains -L
    assert format_marks(marks, names()).splitlines()[2].split()[3:7] == [
        "!203.0.113.0/24", "extip", "any", "http,6000-6010"]
    # the kernel's hit counts, when the listing carries them (Service list)
    counted = format_marks([dict(marks[0], hits=7), dict(marks[1], hits=0)], names(True)).splitlines()
    assert counted[0].split()[-1] == "hits"
    assert [line.split()[-1] for line in counted[1:]] == ["7", "0"]
    masq = [{"name": "web-replies", "protocol": "tcp", "source": "10.16.0.27/32", "source_invert": False,
             "destination": None, "destination_invert": False, "source_ports": [80],
             "destination_ports": None, "output_interface": None}]
    assert format_masquerade(masq, names(True)).splitlines()[1].split() == [
        "web-replies", "tcp", "10.16.0.27", "anywhere", "80", "any", "any"]
    assert format_masquerade(masq, names()).splitlines()[1].split()[2:5] == ["web1", "anywhere", "http"]


def test_status():
    text = format_status({"version": "0.1.0", "revision": 4, "socket": "/run/masqd/masqd.sock",
                          "state_file": "/var/lib/masqd/state.json",
                          "tables": {"portfw": 1, "autofw": 0, "mfw": 2, "marks": 2, "masquerade": 3}})
    assert text.splitlines() == [
        "masqd 0.1.0, revision 4", "socket:     /run/masqd/masqd.sock",
        "state file: /var/lib/masqd/state.json", "portfw:     1 entries", "autofw:     0 entries",
        "mfw:        2 entries", "marks:      2 entries", "masquerade: 3 entries"]


def test_backends_are_listed_head_first_like_the_kernel_list():
    entry = [{"protocol": "tcp", "local_address": "198.51.100.1", "local_port": 80,
              "backends": [{"address": "10.16.0.27", "port": 80, "pref": 15, "pcnt": 15, "head": False},
                           {"address": "10.16.0.28", "port": 80, "pref": 5, "pcnt": 2, "head": True}]}]
    rows = [row.split() for row in format_portfw(entry, names(True)).splitlines()[1:]]
    assert [(r[2], r[5], r[6]) for r in rows] == [("10.16.0.28", "2", "5"), ("10.16.0.27", "15", "15")]
    mfw = [{"mark": 1, "backends": [{"address": "10.16.0.3", "port": None, "pref": 0, "head": False},
                                    {"address": "10.16.0.46", "port": None, "pref": 0, "head": True}]}]
    assert [r.split()[1] for r in format_mfw(mfw, names(True)).splitlines()[1:]] == ["10.16.0.46", "10.16.0.3"]
