#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: gateway_agent
short_description: Put the masqd agent on a gateway, set its kernel settings and keep it running, in one run
version_added: 0.1.0
description:
  - Everything the C(ipmasq.gateway.gateway) role needs on a gateway before the
    agent's tables, checked in one module run, so that an unchanged gateway costs one
    round trip (a fleet re-run is dominated by the number of module runs per host).
  - Makes O(directories) exist, installs the agent file O(dest) (compared by SHA-1;
    the file is transferred only when it differs), points each of O(links) at it,
    sets the O(sysctls) and every interface's C(rp_filter) in C(/proc/sys) (of the
    host's network namespace), optionally persists them in O(sysctl_file), and,
    with O(daemon), runs the agent under C(start-stop-daemon) (hosts without a service
    manager, such as namespace labs); it is started when not running, restarted when
    its file changed, and in both cases waited for until its socket exists.
  - Directories are only made to exist; an existing one keeps its owner and mode.
  - Under systemd leave out O(daemon); the role's unit and
    M(ansible.builtin.systemd_service) run the agent, and RV(agent_changed) says
    whether it needs a restart.
author: ipmasq.gateway developers (@ipmasq)
options:
  src:
    description:
      - The agent file on the controller (for example the
        C(ipmasq.gateway.agent_zipapp) lookup's result). It is sent to the gateway
        only when its SHA-1 differs from O(dest)'s.
    type: path
    required: true
  dest:
    description: Where the agent file goes on the gateway (mode 0755, owned by root).
    type: path
    required: true
  links:
    description: Symbolic links that must point at O(dest) (the C(masqd) and C(masqctl) commands).
    type: list
    elements: path
    default: []
  directories:
    description: Directories that must exist (parents included); existing ones are left as they are.
    type: list
    elements: path
    default: []
  sysctls:
    description:
      - Kernel settings by their dotted name (C(net.ipv4.ip_forward)) and the value
        they must have; only the ones that differ are written.
    type: dict
    default: {}
  rp_filter:
    description:
      - The C(rp_filter) value every interface under C(net.ipv4.conf) must have
        (C(all) and C(default) belong in O(sysctls)); the kernel applies the larger of
        C(all)'s and the interface's value, so C(all) alone cannot make a loose
        interface strict.
    type: str
    choices: ['0', '1', '2']
  sysctl_file:
    description:
      - A C(sysctl.d) file that persists O(sysctls) (and O(rp_filter) for every
        interface, also those that appear later). Not written when not given.
    type: path
  daemon:
    description:
      - Run the agent under C(start-stop-daemon). Leave out under systemd.
    type: dict
    suboptions:
      python:
        description:
          - The interpreter the agent runs as (the agent file's C(#!) line), which
            C(start-stop-daemon --exec) matches together with O(daemon.pidfile).
        type: path
        required: true
      command:
        description: The command that starts the agent (a link to O(dest) named C(masqd)).
        type: path
        required: true
      args:
        description: The agent's arguments.
        type: list
        elements: str
        default: []
      pidfile:
        description: The agent's pidfile.
        type: path
        required: true
      log:
        description: Where the agent's output goes.
        type: path
        required: true
      socket:
        description:
          - The agent's socket. A stale one is removed before a start, and a start
            waits until it exists.
        type: path
        required: true
      start_timeout:
        description: Seconds to wait for the socket of a started agent.
        type: int
        default: 15
  checksum:
    description: Internal; the action plugin fills it with O(src)'s SHA-1.
    type: str
  agent_file:
    description: Internal; the action plugin fills it with the transferred copy of O(src).
    type: path
notes:
  - The action plugin runs the module once; only when the agent file differs does it
    transfer O(src) and run it a second time.
  - Supports check mode (reports what would change, changes nothing) and diff mode
    (the kernel settings before and after).
attributes:
  check_mode:
    support: full
    description: Reports in RV(changes) what would change and changes nothing.
  diff_mode:
    support: partial
    description: The kernel settings that change, with their values before and after.
"""

EXAMPLES = r"""
- name: Put the agent on the gateway and run it without a service manager
  ipmasq.gateway.gateway_agent:
    src: "{{ lookup('ipmasq.gateway.agent_zipapp', interpreter='/usr/bin/python3') }}"
    dest: /usr/local/lib/masqd/masqd.pyz
    links: [/usr/local/sbin/masqd, /usr/local/sbin/masqctl]
    directories: [/usr/local/sbin, /run/masqd]
    sysctls:
      net.ipv4.ip_forward: "1"
      net.ipv4.conf.all.rp_filter: "1"
      net.ipv4.conf.default.rp_filter: "1"
    rp_filter: "1"
    sysctl_file: /etc/sysctl.d/90-ipmasq-gateway.conf
    daemon:
      python: /usr/bin/python3
      command: /usr/local/sbin/masqd
      args: [--state-dir, /var/lib/masqd, --socket, /run/masqd/masqd.sock]
      pidfile: /run/masqd/masqd.pid
      log: /var/log/masqd.log
      socket: /run/masqd/masqd.sock
"""

RETURN = r"""
changes:
  description: What was changed (would be changed, in check mode), one line each.
  returned: always
  type: list
  elements: str
  sample: ["agent file /usr/local/lib/masqd/masqd.pyz", "net.ipv4.ip_forward=1", "started masqd"]
agent_changed:
  description: The agent file was (would be) replaced; a running agent needs a restart to use it.
  returned: always
  type: bool
started:
  description: With O(daemon), the agent was (would be) started or restarted by this run.
  returned: always
  type: bool
sysctls_changed:
  description: The kernel settings that were (would be) written, with their new values.
  returned: always
  type: dict
  sample: {"net.ipv4.ip_forward": "1", "net.ipv4.conf.eth0.rp_filter": "1"}
"""

import os
import re
import time

from ansible.module_utils.basic import AnsibleModule

SYSCTL_ROOT = "/proc/sys"
IPV4_CONF = "net/ipv4/conf"
SYSCTL_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+")
SSD = "start-stop-daemon"
# start-stop-daemon --status: 0 running; 1 dead, pidfile left; 3 not running.
SSD_NOT_RUNNING = (1, 3)
LOG_LINES = 40


class Gateway:
    """One gateway's checks and changes; records what changed, changes nothing in check mode."""

    def __init__(self, module: AnsibleModule):
        self.module = module
        self.check = module.check_mode
        self.changes: list[str] = []
        self.sysctls_changed: dict[str, str] = {}
        self.sysctls_before: dict[str, str] = {}

    def changed(self, what: str) -> bool:
        """Record `what` as a change; True when it is to be carried out."""
        self.changes.append(what)
        return not self.check

    def refuse_bad_input(self, params: dict, sysctls: dict[str, str]) -> None:
        """Fails, before anything is changed, on a value that cannot be carried out."""
        for path in params["directories"]:
            if os.path.lexists(path) and not os.path.isdir(path):
                self.module.fail_json(msg="directories: %s exists and is not a directory" % path)
        for path in params["links"]:
            if os.path.isdir(path) and not os.path.islink(path):
                self.module.fail_json(msg="links: %s is a directory" % path)
        if os.path.isdir(params["dest"]):
            self.module.fail_json(msg="dest: %s is a directory" % params["dest"])
        for name in sysctls:
            if not SYSCTL_NAME.fullmatch(name):
                self.module.fail_json(msg="sysctls: %r is not a setting's dotted name" % name)
            if not os.path.isfile(sysctl_path(name)):
                self.module.fail_json(msg="sysctls: %s cannot be read: no such setting" % name)

    def directories(self, paths: list[str]) -> None:
        for path in paths:
            if os.path.isdir(path):
                continue
            if self.changed("directory %s" % path):
                os.makedirs(path, exist_ok=True)

    def agent_file(self, dest: str, differs: bool, agent_file: str | None) -> None:
        """Installs the transferred copy at `dest` when it differs (in check mode there is
        no copy: the change is only recorded)."""
        if differs and self.changed("agent file %s" % dest) and agent_file is not None:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self.module.atomic_move(agent_file, dest)
        if os.path.exists(dest):
            # Each applies only outside check mode and says whether anything differed.
            if (self.module.set_mode_if_different(dest, "0755", False)
                    | self.module.set_owner_if_different(dest, "root", False)
                    | self.module.set_group_if_different(dest, "root", False)):
                self.changes.append("owner and mode of %s" % dest)
        return True

    def links(self, dest: str, paths: list[str]) -> None:
        for path in paths:
            if os.path.islink(path) and os.readlink(path) == dest:
                continue
            if self.changed("link %s -> %s" % (path, dest)):
                temporary = "%s.%d.tmp" % (path, os.getpid())
                os.symlink(dest, temporary)
                os.replace(temporary, path)  # atomic: the command never disappears

    def sysctl(self, name: str, value: str, path: str | None = None) -> None:
        path = path or sysctl_path(name)
        try:
            with open(path, encoding="ascii") as handle:
                current = handle.read().strip()
        except OSError as exc:
            self.module.fail_json(msg="sysctls: %s cannot be read: %s" % (name, exc.strerror))
        if current == value:
            return
        self.sysctls_changed[name] = value
        self.sysctls_before[name] = current
        if self.changed("%s=%s" % (name, value)):
            try:
                with open(path, "w", encoding="ascii") as handle:
                    handle.write(value + "\n")
            except OSError as exc:
                self.module.fail_json(msg="sysctls: %s=%s cannot be written: %s" % (name, value, exc.strerror))

    def interfaces_rp_filter(self, value: str) -> None:
        conf = os.path.join(SYSCTL_ROOT, IPV4_CONF)
        for interface in sorted(os.listdir(conf)):
            if interface not in ("all", "default"):  # a name may hold dots (eth0.100): by path
                self.sysctl("net.ipv4.conf.%s.rp_filter" % interface, value,
                            os.path.join(conf, interface, "rp_filter"))

    def persist(self, path: str, sysctls: dict[str, str], rp_filter: str | None) -> None:
        lines = ["# Written by the ipmasq.gateway gateway role; changes are overwritten.",
                 "# Forwarding and reverse path filtering for the ipmasq.gateway agent (masqd)."]
        lines += ["%s = %s" % item for item in sysctls.items()]
        if rp_filter is not None:
            lines += ["# every interface, also those that appear later (systemd-sysctl applies globs to new ones)",
                      "net.ipv4.conf.*.rp_filter = %s" % rp_filter]
        content = "\n".join(lines) + "\n"
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.read() == content:
                    return
        except FileNotFoundError:
            pass
        if self.changed("sysctl file %s" % path):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            temporary = "%s.%d.tmp" % (path, os.getpid())
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(content)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)

    def daemon(self, spec: dict, file_changed: bool) -> bool:
        """Starts the agent when it is not running, restarts it when its file changed;
        waits for its socket. Returns whether it was (would be) started."""
        match = ["--pidfile", spec["pidfile"], "--exec", spec["python"]]
        rc, out, err = self.module.run_command([SSD, "--status"] + match)
        if rc not in (0,) + SSD_NOT_RUNNING:
            self.module.fail_json(msg="daemon: start-stop-daemon --status failed (rc %d): %s" % (rc, (err or out).strip()))
        running = rc == 0
        if running and not file_changed:
            return False
        if not self.changed("restarted masqd" if running else "started masqd"):
            return True
        if running:
            rc, out, err = self.module.run_command([SSD, "--stop", "--oknodo", "--retry", "TERM/5/KILL/2", "--remove-pidfile"] + match)
            if rc != 0:
                self.module.fail_json(msg="daemon: the agent did not stop (rc %d): %s" % (rc, (err or out).strip()))
        if os.path.lexists(spec["socket"]):
            os.unlink(spec["socket"])  # left by an agent that is not running
        for path in (spec["pidfile"], spec["log"]):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        start = ([SSD, "--start", "--oknodo", "--background", "--make-pidfile"] + match
                 + ["--startas", spec["command"], "--output", spec["log"], "--"] + spec["args"])
        rc, out, err = self.module.run_command(start)
        if rc != 0:
            self.module.fail_json(msg="daemon: start-stop-daemon --start failed (rc %d): %s" % (rc, (err or out).strip()))
        self.wait_for_socket(spec)
        return True

    def wait_for_socket(self, spec: dict) -> None:
        deadline = time.monotonic() + spec["start_timeout"]
        while not os.path.exists(spec["socket"]):
            if time.monotonic() > deadline:
                self.module.fail_json(msg="masqd did not create %s within %d s. Last lines of %s:\n%s"
                                      % (spec["socket"], spec["start_timeout"], spec["log"], tail(spec["log"])))
            time.sleep(0.02)


def sysctl_path(name: str) -> str:
    return os.path.join(SYSCTL_ROOT, name.replace(".", "/"))


def tail(path: str, lines: int = LOG_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as exc:
        return "(%s)" % exc.strerror


def settings(values: dict[str, str]) -> str:
    return "".join("%s = %s\n" % item for item in values.items())


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            links=dict(type="list", elements="path", default=[]),
            directories=dict(type="list", elements="path", default=[]),
            sysctls=dict(type="dict", default={}),
            rp_filter=dict(type="str", choices=["0", "1", "2"]),
            sysctl_file=dict(type="path"),
            daemon=dict(type="dict", options=dict(
                python=dict(type="path", required=True),
                command=dict(type="path", required=True),
                args=dict(type="list", elements="str", default=[]),
                pidfile=dict(type="path", required=True),
                log=dict(type="path", required=True),
                socket=dict(type="path", required=True),
                start_timeout=dict(type="int", default=15),
            )),
            checksum=dict(type="str"),
            agent_file=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not params["checksum"]:
        module.fail_json(msg="checksum: missing; run this module through its action plugin (ipmasq.gateway.gateway_agent)")
    sysctls = {str(key): str(value) for key, value in params["sysctls"].items()}
    gateway = Gateway(module)
    gateway.refuse_bad_input(params, sysctls)
    dest = params["dest"]
    agent_changed = (module.sha1(dest) if os.path.isfile(dest) else None) != params["checksum"]
    if agent_changed and not module.check_mode and params["agent_file"] is None:
        # Nothing is changed yet: the action plugin sends the file and runs the module again.
        module.exit_json(changed=False, agent_file_needed=True)
    gateway.directories(params["directories"])
    gateway.agent_file(dest, agent_changed, params["agent_file"])
    gateway.links(dest, params["links"])
    for name, value in sysctls.items():
        gateway.sysctl(name, value)
    if params["rp_filter"] is not None:
        gateway.interfaces_rp_filter(params["rp_filter"])
    if params["sysctl_file"]:
        gateway.persist(params["sysctl_file"], sysctls, params["rp_filter"])
    started = gateway.daemon(params["daemon"], agent_changed) if params["daemon"] else False
    result = dict(changed=bool(gateway.changes), changes=gateway.changes, agent_changed=agent_changed,
                  started=started, sysctls_changed=gateway.sysctls_changed)
    if module._diff and gateway.sysctls_changed:
        result["diff"] = {"before": settings(gateway.sysctls_before), "after": settings(gateway.sysctls_changed)}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
