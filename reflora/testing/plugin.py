"""The pytest plugin (entry point ``pytest11: reflora_testing``): only the suite's command-line options.

``pytest --pyargs reflora.testing.suite`` cannot add options from the suite's
own conftest (pytest reads conftests of --pyargs packages after parsing the
command line), so they are registered here, for every pytest run where
reflora is installed. They do nothing unless the suite is collected: the
candidate loading, report header and xfails live in
``reflora/testing/suite/conftest.py``, which only that run loads.
"""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("reflora", "reflora conformance suite (pytest --pyargs reflora.testing.suite)")
    group.addoption("--max-examples", type=int, default=None,
                    help="reflora suite: hypothesis examples per test "
                         "(default 100 forward/backward, 10 roundtrip, 50 others)")
    group.addoption("--derandomize", action="store_true", default=False,
                    help="reflora suite: a fixed, repeatable sequence of examples")
    group.addoption("--xfails-file", default=None,
                    help="reflora suite: file of test ids or id prefixes expected to fail (# comments)")
