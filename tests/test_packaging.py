"""The version policy: every dependency range has an upper bound no newer than what the suite has
passed on, and the environment running the suite lies inside the ranges; and a wheel carries what
the package reads at run time."""

from fnmatch import fnmatch
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
TOML = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
PYPROJECT = TOML["project"]


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


def test_a_wheel_carries_every_file_the_native_kernels_build_from():
    # an editable install reads them from the source tree; a wheel holds only the package data named
    # in pyproject.toml, and a missing header would leave every user of a wheel on the PyTorch path
    from yoco import native

    patterns = TOML["tool"]["setuptools"]["package-data"]["yoco"]
    package = Path(native.__file__).parent
    for path in (*native.SOURCES, *native.HEADERS):
        name = path.relative_to(package).as_posix()
        assert any(fnmatch(name, pattern) for pattern in patterns), f"{name} is not package data"
