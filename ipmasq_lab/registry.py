"""The registry of labs that are up: one JSON file per lab under /run/ipmasq-lab.

A lab's file is created (O_EXCL, which reserves the prefix) before anything of the lab
exists, and removed after everything is gone, so any lab that ever existed, even half
built, can be found and torn down by another process (`ipmasq-lab down`). Writes are
atomic (tmp + fsync + rename) and serialised by flock on the registry directory.

A record: {"prefix", "spec" (normalized), "namespaces": [...], "pids": [...],
"state": "building"|"up", "owner_pid", "created"}.
"""

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time

from .errors import LabError

RUN_DIR = os.environ.get("IPMASQ_LAB_RUN_DIR", "/run/ipmasq-lab")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,11}$")


def check_prefix(prefix):
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise LabError("prefix %r is not a lab prefix (2-12 lowercase letters and "
                       "digits, starting with a letter, e.g. ml3fa09c)" % (prefix,))
    return prefix


def new_prefix():
    """A fresh random prefix: 'ml' + 6 hex digits."""
    return "ml" + secrets.token_hex(3)


def _path(prefix):
    return os.path.join(RUN_DIR, check_prefix(prefix) + ".json")


def files_dir(prefix):
    """The lab's own file area (agents' sockets, state, logs); removed with the lab."""
    return os.path.join(RUN_DIR, check_prefix(prefix))


@contextlib.contextmanager
def _locked():
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(prefix, record):
    path = _path(prefix)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)


def reserve(prefix, spec, namespaces):
    """Record a lab about to be built; refuses a prefix that is already recorded."""
    record = {"prefix": prefix, "spec": spec, "namespaces": list(namespaces), "pids": [],
              "state": "building", "owner_pid": os.getpid(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with _locked():
        try:
            os.close(os.open(_path(prefix), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise LabError("a lab with prefix %s is already recorded in %s"
                           % (prefix, RUN_DIR)) from None
        _write(prefix, record)
    return record


def read(prefix):
    """The record of a lab, or None when no lab has that prefix."""
    try:
        with open(_path(prefix), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError:
        # Only a crash between O_EXCL and the first rename leaves an empty file.
        return {"prefix": prefix, "spec": None, "namespaces": [], "pids": [],
                "state": "broken"}


def update(prefix, **changes):
    """Merge `changes` into a lab's record; `pids` are added to the recorded ones."""
    with _locked():
        record = read(prefix)
        if record is None:
            raise LabError("no lab with prefix %s is recorded" % prefix)
        pids = changes.pop("pids", None)
        if pids:
            record["pids"] = sorted(set(record.get("pids", [])) | set(pids))
        record.update(changes)
        _write(prefix, record)
        return record


def remove(prefix):
    with _locked():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(prefix))
        shutil.rmtree(files_dir(prefix), ignore_errors=True)
        for name in os.listdir(RUN_DIR):
            if name.startswith(prefix + ".json.") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(RUN_DIR, name))


def prefixes():
    """Prefixes of every recorded lab, sorted."""
    try:
        names = os.listdir(RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".json") and PREFIX_RE.match(n[:-5]))
