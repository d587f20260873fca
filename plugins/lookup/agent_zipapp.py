# Copyright: ipmasq.gateway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: agent_zipapp
short_description: The masqd agent as one zip application, built on the controller
version_added: 0.1.0
description:
  - Packs the collection's C(masqd) package into one deterministic zip file on the
    controller and returns its path, for M(ansible.builtin.copy) to ship as one file,
    compared by checksum, so an unchanged agent costs one stat on the gateway.
  - The same sources give the same bytes on every controller (files in sorted order,
    fixed timestamps and modes), so a re-run from another controller changes nothing.
  - The file is C(masqd.pyz) in a directory named by the hash of its content under
    O(cache_dir), written atomically, so parallel runs and forks share one copy.
  - Run it as C(PYTHONPATH=masqd.pyz python3 -m masqd.daemon) (or C(masqd.masqctl));
    C(python3 masqd.pyz) runs the daemon.
author: ipmasq.gateway developers (@ipmasq)
options:
  _terms:
    description: The directory holding the C(masqd) package; default, the collection's own.
    type: list
    elements: path
    required: false
  cache_dir:
    description: Where the built files are kept on the controller.
    type: path
    default: ~/.ansible/tmp/ipmasq.gateway
"""

EXAMPLES = r"""
- name: Ship the agent as one file
  ansible.builtin.copy:
    src: "{{ lookup('ipmasq.gateway.agent_zipapp') }}"
    dest: /usr/local/lib/masqd/masqd.pyz
    mode: "0644"
"""

RETURN = r"""
_raw:
  description: The path of the built zip application on the controller.
  type: list
  elements: path
"""

import hashlib
import io
import os
import zipfile

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

COLLECTION_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MAIN = b"from masqd.daemon import main\nraise SystemExit(main())\n"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def agent_files(root):
    """(archive name, path) of every .py file of the masqd package under `root`, sorted."""
    package = os.path.join(root, "masqd")
    if not os.path.isfile(os.path.join(package, "daemon.py")):
        raise AnsibleLookupError("masqd not found at %s (the collection's masqd/ package)" % package)
    out = []
    for directory, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


def build(root):
    """The zip application's bytes: the same sources give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        entries = [("__main__.py", None)] + agent_files(root)
        for name, path in entries:
            if path is None:
                data = MAIN
            else:
                with open(path, "rb") as handle:
                    data = handle.read()
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def write_cached(data, cache_dir):
    digest = hashlib.sha256(data).hexdigest()[:20]
    target = os.path.join(cache_dir, digest, "masqd.pyz")
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        tmp = "%s.%d.tmp" % (target, os.getpid())
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    return target


class LookupModule(LookupBase):

    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        cache_dir = os.path.expanduser(self.get_option("cache_dir"))
        roots = terms or [COLLECTION_ROOT]
        return [write_cached(build(os.path.realpath(root)), cache_dir) for root in roots]
