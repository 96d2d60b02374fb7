import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI profile: small and fast; DILCONV_HYPOTHESIS=long for a deeper run.
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("DILCONV_HYPOTHESIS", "ci"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DILCONV_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set DILCONV_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    # A seed per test, stable across runs, so failures reproduce.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
