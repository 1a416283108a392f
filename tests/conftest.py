import os

from hypothesis import settings

# CI runs a fixed, reproducible set of examples; locally hypothesis explores.
# no example database under CI: a checkout then draws exactly what a clean CI run draws
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The suite runs as a user's process does, through a plan cache: one new folder per run
# (never the user's cache folder), made by the first process and shared by the xdist
# workers it starts, so a program several tests plan is planned once and read back from
# its file after (test_plan_cache.py proves a stored plan is the plan made, and uses a
# folder of its own). AUTOTP_TEST_PLAN_CACHE=off plans everything in every test;
# =DIR keeps the plans in DIR.
if "AUTOTP_TEST_PLAN_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _plans = tempfile.mkdtemp(prefix="autotp-test-plans-")
    os.environ["AUTOTP_TEST_PLAN_CACHE"] = _plans
    atexit.register(shutil.rmtree, _plans, ignore_errors=True)
os.environ["AUTOTP_PLAN_CACHE"] = os.environ["AUTOTP_TEST_PLAN_CACHE"]

# the suite runs on two pytest-xdist workers (pyproject's addopts), one per core: torch's
# own intra-op threads would make each worker fight the other for both cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


# -- markers: `gloo`, `launch` and `hf` from what a test calls --------------------------
# A test is marked by what its own code, its fixtures and the helpers of its module that it
# calls (transitively) read: run_on_gloo or gloo (gloo), `python -m autotp ...` in another
# process (launch: the runner through torchrun, the CLI), transformers or tests/hf_models.py
# (hf). `slow` is written on the test.
_WORDS = {  # as ast.unparse writes the code: strings in single quotes
    "gloo": ("run_on_gloo", "gloo"),
    "launch": ("'-m', 'autotp'",),
    "hf": ("transformers", "hf_models", "'hf:"),
}


def _module_kinds(module: object) -> dict[str, set[str]]:
    """Each top-level function of a test module -> the kinds it reaches."""
    import ast
    import inspect

    cached = getattr(module, "_autotp_kinds", None)
    if cached is not None:
        return cached
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    hf_names = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module in ("hf_models", "transformers")
        for alias in node.names
    }
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    direct: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    for name, node in funcs.items():
        text = ast.unparse(node)
        direct[name] = {k for k, words in _WORDS.items() if any(w in text for w in words)}
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if used & hf_names:
            direct[name].add("hf")
        calls[name] = used & funcs.keys()
    kinds = {name: set(direct[name]) for name in funcs}
    changed = True
    while changed:  # the closure over the module's own helpers
        changed = False
        for name in funcs:
            reached = set().union(*(kinds[c] for c in calls[name])) if calls[name] else set()
            if not reached <= kinds[name]:
                kinds[name] |= reached
                changed = True
    module._autotp_kinds = kinds  # type: ignore[attr-defined]
    return kinds


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    import pytest

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        kinds = _module_kinds(item.module)
        reached = set(kinds.get(fn.__name__, ()))
        for fixture in getattr(item, "fixturenames", ()):
            reached |= kinds.get(fixture, set())
        for kind in sorted(reached):
            item.add_marker(getattr(pytest.mark, kind))
