import pytest

from tests.backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    """Each unit property runs against both packages, on CPU."""
    return BACKENDS[request.param]("cpu")


@pytest.fixture(params=["native", "python"])
def mix_kernel(request):
    """Run a torch test with the C++ mixing kernel and again with the Python one."""
    from mhc_torch import _native

    if request.param == "python":
        with _native.python_kernel():
            yield request.param
        return
    if _native.native_kernel() is None:
        pytest.skip("the C++ mixing kernel could not be built here (see the warning above)")
    yield request.param
