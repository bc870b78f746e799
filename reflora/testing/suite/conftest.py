"""pytest options, candidate loading and xfails for ``pytest --pyargs reflora.testing.suite``."""

from __future__ import annotations

import importlib
import os
import warnings

import pytest

#: The serving kernels the suite checks (tests in test_serving_candidate.py), looked up the same way.
SERVING = ("shrink", "expand", "multi_forward", "multi_backward", "sliced_forward", "embedding", "embedding_backward",
           "tp_forward")
CALLABLES = ("forward", "backward", "train_step", "merge", "scaling", "save", "load", "unmerge", "init",
             "lora_bias_forward", "lora_bias_backward", "dora_forward", "dora_backward")
SETTINGS = ("dtypes", "to", "layout", "policy")
ENV = "REFLORA_CANDIDATE"
DTYPES = ("float64", "float32", "float16", "bfloat16")


class Candidate:
    """What REFLORA_CANDIDATE names, with the callables and settings found on it."""

    def __init__(self, spec: str):
        self.spec = spec
        mod_name, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(mod_name)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise pytest.UsageError(f"${ENV}={spec!r} cannot be loaded: {type(exc).__name__}: {exc}; "
                                    "expected 'module:attribute' or 'module'") from None

        def get(name):
            return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

        self.fns = {n: get(n) for n in CALLABLES if callable(get(n))}
        self.dtypes = tuple(get("dtypes") or ("float32",))
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad:
            raise pytest.UsageError(f"{spec}.dtypes has {bad}; expected names among {DTYPES}")
        self.to = get("to")
        self.layout = get("layout")
        self.policy = get("policy")

    def require(self, *names):
        missing = [n for n in names if n not in self.fns]
        if missing:
            pytest.skip(f"the candidate has no {' / '.join(missing)}")
        return [self.fns[n] for n in names]

    def require_dtype(self, dtype):
        if dtype not in self.dtypes:
            pytest.skip(f"the candidate does not compute in {dtype} (its dtypes: {', '.join(self.dtypes)})")


def _candidate(config) -> Candidate:
    cand = getattr(config, "_reflora_candidate", None)
    if cand is None:
        spec = os.environ.get(ENV)
        if not spec:
            raise pytest.UsageError(f"${ENV} is not set; expected e.g. {ENV}=mypkg.lora:candidate "
                                    "(see `python -c 'import reflora.testing.suite as s; help(s)'`)")
        cand = config._reflora_candidate = Candidate(spec)
    return cand


def pytest_configure(config):
    _candidate(config)
    config.addinivalue_line("markers", "reflora_dtype(name): the dtype a conformance test runs in")


def pytest_report_collectionfinish(config, start_path, items):
    # (pytest_report_header runs before a --pyargs package's conftest is loaded; this runs after collection)
    cand = _candidate(config)
    found = ", ".join(cand.fns) or "none"
    missing = ", ".join(n for n in CALLABLES if n not in cand.fns) or "none"
    serving = [n for n in SERVING if serving_fn(cand, n) is not None]
    return [f"reflora candidate: {cand.spec}",
            f"  callables found: {found}",
            f"  skipped (not provided): {missing}",
            f"  serving kernels found: {', '.join(serving) or 'none'} (of {len(SERVING)})",
            f"  dtypes: {', '.join(cand.dtypes)}; arrays via: {cand.to or 'numpy'}; layout: {cand.layout or '-'}"]


def _read_xfails(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise pytest.UsageError(f"--xfails-file {path!r}: {exc}") from None
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def pytest_collection_modifyitems(session, config, items):
    path = config.getoption("--xfails-file")
    if not path:
        return
    ids = _read_xfails(path)
    used = set()
    for item in items:
        short = f"{os.path.basename(item.path)}::{item.name}" if hasattr(item, "path") else item.name
        for line in ids:
            if item.name.startswith(line) or short.startswith(line) or item.nodeid.startswith(line):
                used.add(line)
                item.add_marker(pytest.mark.xfail(reason=f"listed in {path}: {line}", strict=False))
                break
    unused = [line for line in ids if line not in used]
    if unused:
        msg = f"--xfails-file {path}: {len(unused)} id(s) match no test: {', '.join(unused)}"
        config._reflora_xfail_unused = msg
        warnings.warn(pytest.PytestWarning(msg), stacklevel=1)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    msg = getattr(config, "_reflora_xfail_unused", None)
    if msg:
        terminalreporter.write_sep("-", "reflora xfails")
        terminalreporter.write_line(f"WARNING: {msg}")


@pytest.fixture(scope="session")
def candidate(request) -> Candidate:
    return _candidate(request.config)


@pytest.fixture(scope="session")
def options(request) -> dict:
    return {"max_examples": request.config.getoption("--max-examples"),
            "derandomize": request.config.getoption("--derandomize")}


def serving_fn(cand: Candidate, name: str):
    """The candidate's serving callable ``name``, or None (the object named by the spec, as for the others)."""
    mod_name, _, attr = cand.spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    fn = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return fn if callable(fn) else None
