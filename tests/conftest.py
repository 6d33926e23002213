import pytest
from dist_pool import DistPool


@pytest.fixture(scope="module")
def pool():
    """Four gloo ranks for the whole test module (process start costs seconds)."""
    p = DistPool(world_size=4)
    yield p
    p.close()
