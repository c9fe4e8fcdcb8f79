"""Packaging: pyproject's ranges, constraints.txt's exact set, the installed versions, LICENSE.

pyproject.toml declares compatible ranges (so `pip install jaxret` works beside other packages);
constraints.txt is the exact set checked together, which `make` installs with `-c`.
"""
import importlib.metadata
import pathlib
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
LICENSE = ROOT / "LICENSE"


def _project():
  return tomllib.loads(PYPROJECT.read_text())["project"]


def _declared():
  """Every requirement pyproject declares, core and extras, without jaxret[...] self-references."""
  project = _project()
  reqs = [Requirement(r) for r in project["dependencies"]]
  for extra in project["optional-dependencies"].values():
    reqs += [Requirement(r) for r in extra]
  return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def _pins():
  """constraints.txt as {canonical name: exact version}; every line must be `name==version`."""
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    req = Requirement(line)
    specs = list(req.specifier)
    assert not req.extras and not req.marker, f"constraints.txt takes name==version only: {line!r}"
    assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line!r}"
    name = canonicalize_name(req.name)
    assert name not in pins, f"pinned twice in constraints.txt: {req.name}"
    pins[name] = Version(specs[0].version)
  return pins


def test_pins_satisfy_declared_ranges():
  pins = _pins()
  for req in _declared():
    name = canonicalize_name(req.name)
    assert name in pins, f"{req} has no pin in constraints.txt"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req}")


def test_every_pin_is_declared():
  declared = {canonicalize_name(r.name) for r in _declared()}
  extra = sorted(set(_pins()) - declared)
  assert not extra, f"constraints.txt pins packages pyproject does not declare: {extra}"


def test_ranges_not_exact_pins():
  for req in _declared():
    assert not any(s.operator == "==" for s in req.specifier), f"{req}: declare a range"
    assert any(s.operator == ">=" for s in req.specifier), f"{req}: no lower bound"
    assert any(s.operator == "<" for s in req.specifier), f"{req}: no upper bound"


def test_jax_and_jaxlib_in_lockstep():
  # jax, jaxlib, jax[cuda12] and jax[tpu] all take the same range.
  ranges = {str(r.specifier) for r in _declared() if canonicalize_name(r.name) in ("jax", "jaxlib")}
  assert len(ranges) == 1, ranges
  pins = _pins()
  assert pins["jax"] == pins["jaxlib"]


def test_extras():
  extras = _project()["optional-dependencies"]
  assert {"export", "demo", "gpu", "tpu", "test"} <= set(extras)
  names = lambda extra: {(canonicalize_name(Requirement(r).name), frozenset(Requirement(r).extras))
                         for r in extras[extra]}
  assert {n for n, _ in names("export")} == {"torch", "transformers", "safetensors"}
  assert ("jax", frozenset({"cuda12"})) in names("gpu")
  assert ("jax", frozenset({"tpu"})) in names("tpu")


@pytest.mark.parametrize("name", sorted(_pins()))
def test_installed_versions_match_constraints(name):
  try:
    installed = importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"{name} is not installed")
  pin = _pins()[name]
  # `==2.13.0` matches a local build such as 2.13.0+cpu, as pip does.
  assert SpecifierSet(f"=={pin}").contains(installed, prereleases=True), (
      f"{name} {installed} is installed; constraints.txt pins {pin}: run `make`")


def test_license_is_apache_2():
  text = LICENSE.read_text()
  assert text.lstrip().startswith("Apache License")
  assert "Version 2.0, January 2004" in text
  assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
  project = _project()
  assert project["license"] == "Apache-2.0"
  assert project.get("license-files") == ["LICENSE"]


def test_pyproject_stays_inside_the_repo():
  text = PYPROJECT.read_text()
  assert "../" not in text and "..\\" not in text
  assert "shared/" not in text
