"""Test configuration shared by tests/ and parity_tests/.

Hypothesis profiles (select with HYPOTHESIS_PROFILE):
  ci        default: 100 examples per property, derandomized (the same inputs
            every run, so a CI failure reproduces), no example database. 100
            rather than 200 since the residual-stream properties joined
            (`make test` about 22 minutes on 2 cores; it was 23 at 200: the
            slowest tests are the fixed-cost stack parity checks).
  thorough  2000 examples per property with fresh random inputs.
  dev       25 examples, for quick local iteration.
"""

from __future__ import annotations

import os
import re

import jax
from hypothesis import HealthCheck, settings

# Silent dtype promotion and rank broadcasting hide bugs; make them errors for
# our own code (equinox does the same in its test-suite).
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=2000, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_EXAMPLES = re.compile(r"(\d+) passing")


def pytest_configure(config):
    config._mhc_examples = {}


def pytest_runtest_makereport(item, call):
    # Hypothesis's pytest plugin leaves a text summary of each property's run
    # on the item; count the passing examples so the run reports them.
    if call.when == "call" and hasattr(item, "hypothesis_statistics"):
        passing = sum(int(n) for n in _EXAMPLES.findall(item.hypothesis_statistics))
        item.config._mhc_examples[item.nodeid] = passing


def pytest_terminal_summary(terminalreporter, config):
    counts = getattr(config, "_mhc_examples", {})
    if not counts:
        return
    profile = settings.get_current_profile_name()
    suites = {}
    for nodeid, n in counts.items():
        suite = nodeid.split("/", 1)[0]
        total, props = suites.get(suite, (0, 0))
        suites[suite] = (total + n, props + 1)
    terminalreporter.section(f"hypothesis examples run (profile {profile!r})")
    for suite, (total, props) in sorted(suites.items()):
        terminalreporter.write_line(
            f"{suite}: {total} passing examples over {props} properties "
            f"(fewest in one property: {min(n for k, n in counts.items() if k.startswith(suite))})"
        )
