"""What a fresh install gets (pyproject.toml, README.md, .ci/run agree), and what a failing test prints."""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _deps(names) -> dict[str, str]:
    return {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0]: d for d in names}


def test_test_extra_installs_what_the_tests_import():
    test = _deps(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert {"pytest", "hypothesis", "matplotlib"} <= set(test)  # matplotlib: the heatmap and plot tests
    assert "tqdm" in _deps(PYPROJECT["project"]["dependencies"])  # eval's progress bar


def test_lower_bounds_are_the_versions_ci_tests_as_oldest():
    deps = _deps(PYPROJECT["project"]["dependencies"])
    ci = (ROOT / ".ci" / "run").read_text()
    oldest = re.search(r"OLDEST=\$\{MIF_CI_OLDEST:-([^}]*)\}", ci).group(1).split()
    pins = dict(p.split("==") for p in oldest)
    for name in ("torch", "transformers"):
        lower = re.search(r">=([0-9.]+)", deps[name]).group(1)
        assert Version(lower) == Version(pins[name]), (deps[name], pins[name])


def test_readme_says_how_to_pick_the_torch_build_before_the_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in section and 'pip install -e ".[test]" && pytest' in section
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and "pytest_in main" in ci


def test_failing_test_output_has_no_debug_log_lines(pytester):
    """A failure shows WARNING and above of the captured logs: torch's DEBUG ``torch.__trace`` records
    (about 400 lines for one failing compile test) stay out."""
    opts = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert opts["log_level"] == "WARNING"
    pytester.makepyprojecttoml(f'[tool.pytest.ini_options]\nlog_level = "{opts["log_level"]}"\n')
    pytester.makepyfile(test_fails="""
        import logging

        def test_fails():
            log = logging.getLogger("torch_like.__trace")
            log.setLevel(logging.DEBUG)  # as torch sets its trace logger
            log.debug("noise")
            log.warning("kept")
            assert False
    """)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "WARNING  torch_like.__trace" in out and "DEBUG    torch_like.__trace" not in out
