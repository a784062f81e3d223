# -*- test-case-name: tests.test_project -*-
"""
Tests for the project's housekeeping: every module names an existing test
module in its C{test-case-name} header, every release note fragment is
named so that towncrier picks it up, and no merge left conflict markers.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

HEADER = re.compile(r"^# -\*- test-case-name: (?P<names>[\w., ]+) -\*-$")

#: towncrier's fragment types, as configured in pyproject.toml.
FRAGMENT_TYPES = ("security", "feature", "bugfix", "removal", "doc", "misc")
FRAGMENT = re.compile(rf"^\d+\.({'|'.join(FRAGMENT_TYPES)})\.\d+\.rst$")


def testModuleExists(name: str) -> bool:
    """
    @return: Whether C{name} (C{tests.test_x}) is a module of this checkout.
    """
    parts = name.split(".")
    return len(parts) == 2 and parts[0] == "tests" and (ROOT / "tests" / f"{parts[1]}.py").is_file()


class TestCaseNameTests(SynchronousTestCase):
    """
    The C{test-case-name} headers of C{imageio/} point at real tests.
    """

    def test_everyModuleHasAValidHeader(self) -> None:
        """
        Every non-empty module under C{imageio/} starts with a
        C{test-case-name} header naming test modules that exist, so
        C{trial --testmodule} and editors find its tests.
        """
        problems = []
        for path in sorted((ROOT / "imageio").rglob("*.py")):
            text = path.read_text()
            where = path.relative_to(ROOT)
            if not text.strip():
                continue
            m = HEADER.match(text.splitlines()[0])
            if m is None:
                problems.append(f"{where}: no test-case-name header on the first line")
                continue
            for name in (n.strip() for n in m.group("names").split(",")):
                if not testModuleExists(name):
                    problems.append(f"{where}: test-case-name {name} does not exist")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))


class NewsFragmentTests(SynchronousTestCase):
    """
    Release note fragments follow C{newsfragments/README.rst}.
    """

    def test_fragmentNames(self) -> None:
        """
        Every file in C{newsfragments/} but the README is named
        C{<issue>.<type>.<n>.rst} with a configured type and is not empty:
        towncrier silently skips anything else.
        """
        directory = ROOT / "newsfragments"
        problems = []
        for path in sorted(directory.iterdir()):
            if path.name == "README.rst":
                continue
            if not FRAGMENT.match(path.name):
                problems.append(
                    f"{path.name}: expected <issue>.<type>.<n>.rst, type one of "
                    f"{', '.join(FRAGMENT_TYPES)}"
                )
            elif not path.read_text().strip():
                problems.append(f"{path.name}: empty")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    def test_typesMatchConfiguration(self) -> None:
        """
        The fragment types checked here are the ones towncrier is configured
        with.
        """
        config = (ROOT / "pyproject.toml").read_text()
        configured = re.findall(r'^directory = "(\w+)"$', config, re.M)
        self.assertEqual([t for t in configured if t != "newsfragments"], list(FRAGMENT_TYPES))


#: The lines git writes around a conflict when a merge stops (the "=======" between
#: them is also a reStructuredText underline, so it is not looked for).
CONFLICT_MARKER = re.compile(r"^(<{7} |>{7} )", re.M)


class ConflictMarkerTests(SynchronousTestCase):
    """
    No merge left its conflict markers in the project's text.
    """

    def test_noConflictMarkers(self) -> None:
        """
        No source, test, configuration or documentation file has a line
        that starts with a merge conflict marker.
        """
        problems = []
        suffixes = {".py", ".rst", ".md", ".toml", ".cfg", ".conf", ".service", ".txt", ""}
        for top in ("imageio", "tests", "bench", "etc", "twisted", "newsfragments", ".ci"):
            for path in sorted((ROOT / top).rglob("*")):
                if not path.is_file() or path.suffix not in suffixes or "results" in path.parts:
                    continue
                try:
                    text = path.read_text()
                except UnicodeDecodeError:
                    continue
                for m in CONFLICT_MARKER.finditer(text):
                    line = text.count("\n", 0, m.start()) + 1
                    problems.append(f"{path.relative_to(ROOT)}:{line}")
        for name in ("README.rst", "CHANGELOG.rst", "setup.py", "pyproject.toml"):
            text = (ROOT / name).read_text()
            for m in CONFLICT_MARKER.finditer(text):
                problems.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))
