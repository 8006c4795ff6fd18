import pytest

from tests.backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    """Each unit property runs against both packages, on CPU."""
    return BACKENDS[request.param]("cpu")


@pytest.fixture(params=["native", "python"])
def mix_kernel(request, monkeypatch):
    """Run a torch test with the C++ mixing kernel and again with the Python one."""
    from mhc_torch import _native

    if request.param == "python":
        monkeypatch.setitem(_native._loaded, _native._NAME, None)
    elif _native.native_kernel() is None:
        pytest.skip("the C++ mixing kernel could not be built here (see the warning above)")
    return request.param
