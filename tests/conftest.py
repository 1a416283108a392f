import os

from hypothesis import settings

# CI runs a fixed, reproducible set of examples; locally hypothesis explores.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
