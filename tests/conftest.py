"""Hypothesis profiles for the fuzz tests (tests/test_fuzz_*.py) and their counts in the run's summary; the `dist`
mark for tests that use a multi-process fixture.

`ci`, the default, keeps every file kind to a few seconds and draws the same inputs on every run; `long`
draws far more, and new ones each time, for soak runs: `pytest tests/test_fuzz_*.py --hypothesis-profile=long`.
"""

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("long", max_examples=3000, deadline=None, database=None, suppress_health_check=_QUIET,
                          print_blob=True)
settings.load_profile("ci")  # --hypothesis-profile, read after this file, overrides it


def pytest_terminal_summary(terminalreporter):
    import fuzzing

    if not fuzzing.COUNTS:
        return
    terminalreporter.section("fuzzed inputs per file kind")
    for kind, count in sorted(fuzzing.COUNTS.items()):
        refused = fuzzing.FAILED[kind]
        terminalreporter.write_line(f"{kind:<28} {count:>7} inputs, {refused:>7} refused with the named error")


# Fixtures that train on several ranks (module-scoped: the first test to use one pays for it); a test that uses
# one is a `dist` test whatever its own body does.
MULTI_PROCESS_FIXTURES = {"runs"}


def pytest_collection_modifyitems(items):
    import pytest

    for item in items:
        if MULTI_PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.dist)
