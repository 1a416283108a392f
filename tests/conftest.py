import os

from hypothesis import settings

# CI runs a fixed, reproducible set of examples; locally hypothesis explores.
# no example database under CI: a checkout then draws exactly what a clean CI run draws
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# plans are not kept between tests (nor in the user's cache folder): each test plans what
# it tests; test_plan_cache.py turns the cache on in a folder of its own
os.environ["AUTOTP_PLAN_CACHE"] = "off"

# the suite runs on two pytest-xdist workers (pyproject's addopts), one per core: torch's
# own intra-op threads would make each worker fight the other for both cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
