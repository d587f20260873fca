"""Debian roots for booted lab hosts: built once with debootstrap, cached on disk.

A root is `<ROOTS_DIR>/<release>-<key>`, where the key hashes the release, the package
list and the recipe version: a change to either builds a new root (the old one of that
release is removed once the new one is complete). A root is built in a temporary
directory next to its final place and renamed when complete, under an exclusive lock,
so a half-built root is never booted. Boots take a shared lock while nspawn copies it.

Inside a booted host there is no route out, so everything the role needs is put into
the root here (with the machine's own apt access) and its apt lists are refreshed when
older than APT_LISTS_MAX_AGE, so an `apt` task with `cache_valid_time` never needs the
network.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from .errors import LabError

ROOTS_DIR = os.environ.get("IPMASQ_LAB_ROOTS", "/var/cache/ipmasq-lab/roots")
RELEASES = {"bookworm": "12", "trixie": "13"}
# A Debian system reachable over SSH, from Debian's own archive.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt",
    "conntrack", "iproute2", "procps",
)
# What the gateway role installs (its gateway_packages, and gateway_ha_packages for an
# HA pair): downloaded into the root's apt cache, not installed, so the role's apt task
# really installs Debian's packages inside a host that has no route out (apt takes
# verified .debs from its cache).
ROLE_PACKAGES = ("nftables", "python3-nftables", "python3-pyroute2", "keepalived", "conntrackd")
RECIPE_VERSION = 2  # bump when configure() changes what a root holds
# The role's apt task uses cache_valid_time 86400: keep the lists younger than that.
APT_LISTS_MAX_AGE = 12 * 3600
BUILD_TIMEOUT = 1800
COMPLETE_MARK = ".ipmasq-lab-root"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Config the lab adds to every root (paths relative to the root).
SSHD_CONFIG = """\
# ipmasq-lab: root logs in with the lab's key only (bound at /root/.ssh).
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""
# Timers that would try the network or change the host behind a test's back.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "fstrim.timer", "man-db.timer", "systemd-networkd-wait-online.service",
                "getty@tty1.service", "console-getty.service")


def root_key(release, packages=PACKAGES):
    """A short hash of what a root holds: a change builds a new root."""
    text = json.dumps({"release": release, "packages": sorted(packages),
                       "role_packages": sorted(ROLE_PACKAGES), "recipe": RECIPE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def root_path(release, packages=PACKAGES):
    return os.path.join(ROOTS_DIR, "%s-%s" % (release, root_key(release, packages)))


def check_release(release, path="release"):
    from .errors import LabSpecError
    if release not in RELEASES:
        raise LabSpecError(path, release, "%r is not a supported Debian release (%s)"
                           % (release, ", ".join("%s (Debian %s)" % kv for kv in RELEASES.items())))
    return release


def missing_tools():
    """The Debian packages this machine lacks to build and boot roots."""
    missing = []
    if shutil.which("systemd-nspawn") is None:
        missing.append("systemd-container")
    if shutil.which("debootstrap") is None:
        missing.append("debootstrap")
    return missing


def require_tools():
    missing = missing_tools()
    if missing:
        raise LabError("booted hosts (kind: debian) need %s on this machine: "
                       "apt-get install %s (or bash scripts/setup.sh)"
                       % (" and ".join(missing), " ".join(missing)))


def machine_mirror():
    """The Debian archive URI this machine's own apt sources name."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                key, _sep, value = line.partition(":")
                uri = value.strip().split(" ")[0]
                if key.strip() == "URIs" and uri.rstrip("/").endswith("/debian"):
                    return uri
    with contextlib.suppress(FileNotFoundError):
        with open("/etc/apt/sources.list", encoding="utf-8") as handle:
            for line in handle:
                words = line.split()
                if words[:1] == ["deb"]:
                    uri = next((w for w in words[1:] if "://" in w), "")
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
    return DEFAULT_MIRROR


@contextlib.contextmanager
def locked(release, exclusive):
    """flock on <ROOTS_DIR>/<release>.lock: exclusive to build/refresh, shared to boot."""
    os.makedirs(ROOTS_DIR, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(ROOTS_DIR, release + ".lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _run(argv, log, timeout=BUILD_TIMEOUT):
    log.write("+ %s\n" % " ".join(argv))
    log.flush()
    try:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False,
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive",
                                       LC_ALL="C.UTF-8"))
    except subprocess.TimeoutExpired:
        raise LabError("%s did not finish within %d s (log: %s)"
                       % (argv[0], timeout, log.name)) from None
    if proc.returncode != 0:
        raise LabError("%s failed with status %d (log: %s)"
                       % (" ".join(argv[:3]), proc.returncode, log.name))


def configure(root):
    """What the lab needs in a root beyond the packages (see module docstring)."""
    conf_dir = os.path.join(root, "etc/ssh/sshd_config.d")
    os.makedirs(conf_dir, exist_ok=True)
    with open(os.path.join(conf_dir, "ipmasq-lab.conf"), "w", encoding="utf-8") as handle:
        handle.write(SSHD_CONFIG)
    for unit in MASKED_UNITS:
        link = os.path.join(root, "etc/systemd/system", unit)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink("/dev/null", link)
    # nspawn names the host after the machine; no leftover of the build machine's name.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, "etc/hostname"))
    # /root/.ssh is a read-only bind of the lab's key directory at boot.
    os.makedirs(os.path.join(root, "root/.ssh"), mode=0o700, exist_ok=True)


def refresh_apt_lists(root, log, force=False):
    """apt-get update inside the root (the machine's access) when the lists are old, then
    the role's packages into its apt cache (new versions come with new lists)."""
    stamp = os.path.join(root, "var/lib/apt/periodic/update-success-stamp")
    lists = os.path.join(root, "var/lib/apt/lists")
    newest = max((os.stat(p).st_mtime for p in (stamp, lists) if os.path.exists(p)),
                 default=0)
    if not force and time.time() - newest < APT_LISTS_MAX_AGE:
        return False
    _run(["chroot", root, "apt-get", "update", "-q"], log, timeout=300)
    # With their Recommends, as the role's apt task installs them.
    _run(["chroot", root, "apt-get", "install", "-q", "-y", "--download-only",
          *ROLE_PACKAGES], log, timeout=600)
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w", encoding="ascii"):
        pass  # the success stamp apt's own periodic update writes; Ansible reads it
    return True


def build(release, packages=PACKAGES, mirror=None, log_path=None):
    """Build the root for `release` if it is not cached; returns its path."""
    check_release(release)
    require_tools()
    final = root_path(release, packages)
    with locked(release, exclusive=True):
        if os.path.exists(os.path.join(final, COMPLETE_MARK)):
            return final
        tmp = "%s.tmp-%d" % (final, os.getpid())
        log_path = log_path or final + ".log"
        with open(log_path, "w", encoding="utf-8") as log:
            try:
                _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
                      release, tmp, mirror or machine_mirror()], log)
                configure(tmp)
                refresh_apt_lists(tmp, log, force=True)
                with open(os.path.join(tmp, COMPLETE_MARK), "w", encoding="utf-8") as mark:
                    json.dump({"release": release, "packages": sorted(packages),
                               "recipe": RECIPE_VERSION,
                               "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, mark)
                shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        # Older roots of this release (another package list or recipe) are obsolete.
        for other in glob.glob(os.path.join(ROOTS_DIR, release + "-*")):
            if os.path.isdir(other) and other != final and ".tmp-" not in other:
                shutil.rmtree(other, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(other + ".log")
    return final


def ensure(release, packages=PACKAGES):
    """The cached root for `release` (built if missing), its apt lists fresh."""
    final = build(release, packages)
    with locked(release, exclusive=True):
        with open(final + ".log", "a", encoding="utf-8") as log:
            refresh_apt_lists(final, log)
    return final


def main(argv=None):
    """python -m ipmasq_lab.booted_roots [RELEASE...]: build (or check) cached roots."""
    releases = (argv if argv is not None else sys.argv[1:]) or list(RELEASES)
    for release in releases:
        started = time.monotonic()
        path = ensure(release)
        sys.stdout.write("%s: %s (%.0f s)\n" % (release, path, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
