import pytest

from tests.backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    """Each unit property runs against both packages, on CPU."""
    return BACKENDS[request.param]("cpu")
