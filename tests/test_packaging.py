"""The version policy: every dependency range has an upper bound no newer than what the suite has
passed on, and the environment running the suite lies inside the ranges."""

from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]


def declared() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in PYPROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_dependency_has_an_upper_bound():
    unbounded = [str(r) for r in declared()
                 if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not unbounded, f"ranges a future release could enter untested: {unbounded}"


def test_the_installed_releases_are_inside_the_ranges():
    for r in declared():
        assert r.specifier.contains(Version(version(r.name)).public, prereleases=True), \
            f"{r.name} {version(r.name)} is outside {r}"


def test_the_installed_package_declares_the_same_ranges():
    # an editable install made from an older pyproject.toml would test other ranges than it states
    def ranges(reqs):
        return {(r.name, r.specifier) for r in reqs}

    assert ranges(declared()) == ranges(Requirement(r) for r in requires("yoco"))
