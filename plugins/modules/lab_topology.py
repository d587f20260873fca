#!/usr/bin/python
# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_topology
short_description: Bring a network-namespace lab up or down
version_added: 0.1.0
description:
  - Builds a lab of the C(ipmasq_lab) harness from a spec, or tears one down. A lab is a
    set of network namespaces named C(<prefix>-<host>), joined by veth pairs and bridges,
    never linked to the machine's own namespace and with no route out of the lab.
  - The spec is validated completely before anything is created; a refused spec fails
    the task with a message naming the offending entry and value, and changes nothing.
  - With O(state=present) and a O(prefix), the module is idempotent. If a lab with that
    prefix is up with the same spec, nothing changes. If it is up with a different spec,
    or only partly exists, it is torn down and rebuilt. Without O(prefix) every run
    builds a new lab with a fresh random prefix (returned in RV(prefix)).
  - Runs where the lab lives (usually C(localhost)), as root. The harness ships with the
    module; the interpreter needs only pyroute2 and PyYAML.
  - A shipped topology name in O(spec) is read from the collection on the controller.
  - A host whose C(kind) is C(debian) is a Debian system booted with systemd in its namespace
    (C(docs/hosts.md)); RV(hosts) then gives its SSH address, the lab's key and the
    inventory variables that reach it (C(ansible)). The lab counts as up only while
    every booted host runs.
  - The same labs can be handled with the C(ipmasq-lab) CLI (C(ipmasq-lab list),
    C(ipmasq-lab down PREFIX)) and from Python (C(ipmasq_lab.Lab.attach(prefix))).
author: ipmasq.gateway developers (@ipmasq)
options:
  spec:
    description:
      - The lab spec, as a dict in the format of C(docs/lab.md), a path to a YAML spec
        file, or the name of a topology shipped with the harness (V(seed)).
      - Required with O(state=present); ignored with O(state=absent).
    type: raw
  prefix:
    description:
      - The lab's prefix (2-12 lowercase letters and digits, starting with a letter).
      - Required with O(state=absent). With O(state=present) it makes the task idempotent.
    type: str
  state:
    description: Whether the lab is up (V(present)) or gone (V(absent)).
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    support: full
    description: Reports the lab that would be built or removed, and builds or removes nothing.
  diff_mode:
    support: none
    description: No diff is returned.
notes:
  - Every namespace, process and registry record of the lab is removed by O(state=absent),
    including processes started inside the lab's namespaces.
  - Lab state is recorded under C(/run/ipmasq-lab/<prefix>.json).
requirements:
  - pyroute2 and PyYAML on the target's Python (the lab harness itself ships with the module).
  - Root, on a Linux kernel with veth and bridge support.
"""

EXAMPLES = r"""
- name: Bring up the seed's reference lab under a fixed prefix
  ipmasq.gateway.lab_topology:
    spec: seed
    prefix: mlci01
    state: present
  register: lab

- name: Show where the gateway lives
  ansible.builtin.debug:
    msg: "gateway namespace {{ lab.hosts.gateway.netns }}"

- name: A small lab given inline
  ipmasq.gateway.lab_topology:
    prefix: mltwo
    spec:
      hosts:
        a:
          interfaces:
            eth0: {addresses: [10.1.0.1/24, fd00:1::1/64]}
        b:
          interfaces:
            eth0: {addresses: [10.1.0.2/24, fd00:1::2/64]}
      links:
        - [a:eth0, b:eth0]

- name: Tear a lab down
  ipmasq.gateway.lab_topology:
    prefix: mlci01
    state: absent
"""

RETURN = r"""
prefix:
  description: The lab's prefix (null in check mode when a new prefix would be drawn).
  returned: always
  type: str
  sample: mlci01
namespaces:
  description: Every namespace of the lab; empty when O(state=absent).
  returned: always
  type: list
  elements: str
  sample: [mlci01-client, mlci01-gateway, mlci01-web1, mlci01-switch]
hosts:
  description: Per host, its namespace and the addresses of its interfaces.
  returned: always
  type: dict
  sample:
    client:
      netns: mlci01-client
      interfaces:
        eth0: [198.51.100.10/24, 2001:db8:100::10/64]
    gw:
      netns: mlci01-gw
      interfaces: {eth0: [10.9.0.2/24]}
      kind: debian
      release: bookworm
      machine: mlci01-gw
      ssh: {address: 10.9.0.2, user: root, key: /run/ipmasq-lab/mlci01/ssh/id_ed25519,
            controller: controller, controller_netns: mlci01-controller,
            proxy_command: "ip netns exec mlci01-controller socat STDIO TCP:%h:%p"}
      ansible: {ansible_connection: ssh, ansible_host: 10.9.0.2, ansible_user: root}
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab import booted_host, registry, topology
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab import spec as lab_spec
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab.errors import LabError, LabSpecError
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab.lab import Lab
    from ansible_collections.ipmasq.gateway.plugins.module_utils.lab.spec import load_and_validate
except ImportError:
    HAS_IPMASQ_LAB = False
    IPMASQ_LAB_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_IPMASQ_LAB = True
    IPMASQ_LAB_IMPORT_ERROR = None


def _result(lab, changed):
    if lab is None:
        return {"changed": changed, "prefix": None, "namespaces": [], "hosts": {}}
    info = lab.describe()
    return {"changed": changed, "prefix": info["prefix"], "namespaces": info["namespaces"],
            "hosts": info["hosts"]}


def _is_intact(record, spec):
    """A recorded lab that is fully up with exactly `spec`."""
    return (record.get("state") == "up" and record.get("spec") == spec
            and all(topology.exists(ns) for ns in record.get("namespaces", []))
            and booted_host.all_running(record))


def ensure_present(module, spec_source, prefix):
    spec = load_and_validate(spec_source)
    if prefix is None:
        if module.check_mode:
            return {"changed": True, "prefix": None, "namespaces": [], "hosts": {}}
        return _result(Lab(spec).up(), True)
    record = registry.read(prefix)
    if record is not None and _is_intact(record, spec):
        return _result(Lab.attach(prefix), False)
    if module.check_mode:
        planned = Lab(spec, prefix)  # builds nothing: describes what would be built
        return _result(planned, True)
    if record is not None:
        Lab.attach(prefix).down()
    return _result(Lab(spec, prefix).up(), True)


def ensure_absent(module, prefix):
    if registry.read(prefix) is None:
        return _result(None, False)
    if not module.check_mode:
        Lab.attach(prefix).down()
    return _result(None, True)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            spec=dict(type="raw"),
            prefix=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        required_if=[("state", "present", ["spec"]), ("state", "absent", ["prefix"])],
        supports_check_mode=True,
    )
    # The harness imports pyroute2 and PyYAML guarded: None when the target lacks them.
    if not HAS_IPMASQ_LAB or topology.IPRoute is None or lab_spec.yaml is None:
        module.fail_json(msg=missing_required_lib("pyroute2 and PyYAML (the lab "
                                                  "harness's libraries)"),
                         exception=IPMASQ_LAB_IMPORT_ERROR)
    params = module.params
    try:
        if params["prefix"] is not None:
            registry.check_prefix(params["prefix"])
        if params["state"] == "present":
            result = ensure_present(module, params["spec"], params["prefix"])
        else:
            result = ensure_absent(module, params["prefix"])
    except LabSpecError as exc:
        module.fail_json(msg="spec refused: %s" % exc, path=exc.path, value=str(exc.value))
    except LabError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
