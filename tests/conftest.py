"""Shared test set-up: the lab fixtures (lab_factory, seed_lab) for every test, and
pytester, which the lab tests use to run a failing test in a child pytest."""

pytest_plugins = ["pytester", "ipmasq_lab.pytest_plugin"]
