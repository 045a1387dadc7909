"""The fuzz tests' hypothesis settings profiles: ``ci`` (the default) and ``long``.

``ci`` is the budget of the default test command: derandomized (the same examples on every run and
machine, so a failure in CI reproduces locally), no example database, and few examples per test so
that all of tests/fuzz runs in about a minute on a 2-core machine. ``long`` is for a hunt by hand:
random, a hundred times the examples (thousands per test), failures kept in the local database.

Select one with ``--hypothesis-profile=long`` or ``KELIX_FUZZ_PROFILE=long``. tests/conftest.py
registers the profiles when it is loaded, before hypothesis's pytest plugin reads
``--hypothesis-profile`` (a profile registered later, in tests/fuzz/conftest.py, would be unknown to
``python -m pytest tests --hypothesis-profile=long``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "KELIX_FUZZ_PROFILE"
# Examples of the long profile per example of the ci one (see ``budget``).
LONG_FACTOR = 100

# The autouse default-device guard of tests/conftest.py is function-scoped, which hypothesis flags;
# it holds no per-example state (it only reads the test's markers). Models come from module-scoped
# fixtures. too_slow: a tiny model's generate is tens of milliseconds, and some strategies draw
# whole tensors.
_SUPPRESSED = (HealthCheck.function_scoped_fixture, HealthCheck.too_slow)


_registered = False


def register_profiles() -> None:
    """Register ``ci`` and ``long`` and load the one ``KELIX_FUZZ_PROFILE`` names (default ``ci``);
    ``--hypothesis-profile`` then overrides it. Only the first call does anything, so that a later
    one cannot undo the command line's choice."""
    global _registered
    if _registered:
        return
    _registered = True
    settings.register_profile(
        "ci",
        derandomize=True,
        database=None,
        max_examples=10,
        deadline=5000,  # ms; the hard per-example limit is oracle.HANG_S
        suppress_health_check=_SUPPRESSED,
        print_blob=True,
    )
    settings.register_profile(
        "long",
        max_examples=10 * LONG_FACTOR,
        deadline=20000,
        suppress_health_check=_SUPPRESSED,
        print_blob=True,
    )
    settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))


def budget(examples: int) -> int:
    """``examples`` under the ci profile, :data:`LONG_FACTOR` times more under any other: a test
    states its ci budget (its examples cost differently) and the long profile scales it."""
    if settings.get_current_profile_name() == "ci":
        return examples
    return examples * LONG_FACTOR
