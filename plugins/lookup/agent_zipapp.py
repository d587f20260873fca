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
  - With O(interpreter), the file starts with C(#!INTERPRETER) and runs as a command
    C(masqd); called through a link named C(masqctl) it runs masqctl (the name it was
    started by decides). Without, run it as C(python3 masqd.pyz).
author: ipmasq.gateway developers (@ipmasq)
options:
  _terms:
    description: The directory holding the C(masqd) package; default, the collection's own.
    type: list
    elements: path
    required: false
  interpreter:
    description:
      - The Python interpreter of the gateway, written as the file's C(#!) line, so the
        file is executable (mode 0755) without a wrapper script.
    type: str
    required: false
  cache_dir:
    description: Where the built files are kept on the controller.
    type: path
    default: ~/.ansible/tmp/ipmasq.gateway
"""

EXAMPLES = r"""
- name: Ship the agent as one executable file
  ansible.builtin.copy:
    src: "{{ lookup('ipmasq.gateway.agent_zipapp', interpreter='/usr/bin/python3') }}"
    dest: /usr/local/lib/masqd/masqd.pyz
    mode: "0755"
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
# The name the file was started by picks the command: a link named masqctl runs masqctl.
MAIN = (b"import os, sys\n"
        b"if os.path.basename(sys.argv[0]) == 'masqctl':\n"
        b"    from masqd.masqctl import main\n"
        b"else:\n"
        b"    from masqd.daemon import main\n"
        b"raise SystemExit(main())\n")
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


def build(root, interpreter=None):
    """The zip application's bytes: the same sources give the same bytes. A `#!` line
    before the archive is allowed by the zip format (offsets are from the end)."""
    buffer = io.BytesIO()
    if interpreter:
        buffer.write(b"#!" + interpreter.encode() + b"\n")
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
        interpreter = self.get_option("interpreter")
        if interpreter and (not interpreter.startswith("/") or any(c.isspace() for c in interpreter)):
            raise AnsibleLookupError("interpreter must be an absolute path without spaces, got %r" % interpreter)
        roots = terms or [COLLECTION_ROOT]
        return [write_cached(build(os.path.realpath(root), interpreter), cache_dir) for root in roots]
