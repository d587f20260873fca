"""pytest fixtures for namespace labs. Load with `pytest_plugins = ["ipmasq_lab.pytest_plugin"]`.

    def test_forwarding(seed_lab):
        assert seed_lab.run("client", ["ping", "-c", "1", "-W", "1",
                                       seed_lab.address("web1")]).returncode == 0

    def test_custom(lab_factory):
        lab = lab_factory({"hosts": {...}, "links": [...]})

Every lab a fixture builds is torn down after the test, also when the test fails or
raises; a SIGTERM to pytest becomes KeyboardInterrupt while labs are up, so pytest
ends the session cleanly and `pytest_sessionfinish` tears down whatever is left.
"""

import os
import signal

import pytest

from .lab import Lab, die_by_default

_live = []  # labs built by fixtures and not yet torn down


_owner_pid = [0]


def _interrupt(signum, frame):
    if os.getpid() != _owner_pid[0]:
        # A forked child (pyroute2 forks helpers) must never unwind pytest's stack.
        die_by_default(signum)
    raise KeyboardInterrupt("signal %d" % signum)


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("namespace labs need root")


@pytest.fixture
def lab_factory():
    """Build labs: `lab_factory(spec, prefix=None) -> Lab` (spec: path, dict or name)."""
    _need_root()
    built = []
    previous = None
    if not _live:
        _owner_pid[0] = os.getpid()
        previous = signal.signal(signal.SIGTERM, _interrupt)

    def make(spec, prefix=None):
        lab = Lab(spec, prefix)
        lab.up()
        built.append(lab)
        _live.append(lab)
        return lab

    try:
        yield make
    finally:
        errors = []
        for lab in reversed(built):
            try:
                lab.down()
            except Exception as exc:  # tear down the others, then report
                errors.append(exc)
            _live.remove(lab)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if errors:
            raise errors[0]


@pytest.fixture
def seed_lab(lab_factory):
    """The reference topology (ipmasq_lab/topologies/seed.yml), up for one test."""
    return lab_factory("seed")


def pytest_sessionfinish(session, exitstatus):
    while _live:
        _live.pop().down()
