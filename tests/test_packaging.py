"""What the packages are made of, checked from the sources in a second (`.ci/package` builds
them and checks the artifacts): the MIT licence the metadata names is a file of the repository
and goes into both packages; the sdist carries deploy/ and docs/; the wheel leaves out the C
file Cython generates; the image build copies the licence too."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_the_licence_the_metadata_names_is_in_the_repository_and_the_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert "LICENSE" in (ROOT / "Dockerfile").read_text().split("COPY pyproject.toml", 1)[1].splitlines()[0]
    assert "!LICENSE" in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_sdist_carries_deploy_and_docs_and_the_wheel_no_generated_c():
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    for line in ("graft deploy", "graft docs", "exclude broker/_fastpath.c"):
        assert line in manifest, line
    assert any(line.startswith("include LICENSE") for line in manifest)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["exclude-package-data"]["broker"] == ["*.c"]
    assert "alerts.yml" in {p.name for p in (ROOT / "deploy").iterdir()}
