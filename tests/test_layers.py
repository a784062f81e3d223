# -*- test-case-name: tests.test_layers -*-
"""
The layer rule of C{imageio/}, checked on the source (README.rst, "Layout").

Each layer imports only from the layers below it::

    core      imageio, interfaces, ranges, tickets, and the shared helpers
              _log, _buffers, _diskio, _aio, _blkhash, _pki, config
    backends  imageio.backends.*
    web       imageio.web.*
    apps      imageio.daemon.* | imageio.proxy.* | imageio.control.*
              (| imageio.client.*): siblings, never importing each other
    tap       imageio.tap

and a package's private modules (C{_name}) are imported only from inside
that package: C{imageio.web._channel} only by C{imageio.web.*}, while
C{imageio._log}, private to C{imageio}, serves every module.

Every import counts: at module level, inside functions and under
C{if TYPE_CHECKING:}. Known violations that a later step removes are listed
in L{ALLOWED}, each with the step; the test fails for a new violation and
for an allowed one that went away (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "imageio"

#: The shared modules at the package top, all in the bottom layer: they
#: import nothing above it. C{_log} (logging), C{_buffers} (aligned
#: buffers), C{_diskio} (the disk-io pool the backends run on), C{_aio}
#: (Linux AIO, completing direct I/O on the reactor), C{_blkhash}
#: (checksums over backend extents), C{_pki} (certificates for listeners),
#: C{_certdates} (certificate dates without cryptography),
#: C{_twisted_lazytls} and C{_leanreactor} (the reactor core without
#: pyOpenSSL), C{_twisted_leanweb} (C{twisted.web.server} without PB and
#: templates), C{_twisted_dispatch} (the epoll reactor's dispatch of our
#: busy descriptors without a log context per event),
#: C{config} (INI parsing: values only, no layer's objects).
CORE = frozenset(
    {
        "imageio",
        "imageio.interfaces",
        "imageio.ranges",
        "imageio.tickets",
        "imageio._log",
        "imageio._buffers",
        "imageio._diskio",
        "imageio._wakepipe",
        "imageio._aio",
        "imageio._blkhash",
        "imageio._pki",
        "imageio._certdates",
        "imageio._twisted_lazytls",
        "imageio._twisted_leanweb",
        "imageio._leanreactor",
        "imageio._twisted_dispatch",
        "imageio.config",
    }
)

#: Layer rank by top-level package; the application packages share a rank
#: and may not import each other.
PACKAGES = {
    "imageio.backends": ("backends", 1),
    "imageio.web": ("web", 2),
    "imageio.daemon": ("daemon", 3),
    "imageio.proxy": ("proxy", 3),
    "imageio.control": ("control", 3),
    "imageio.client": ("client", 3),
    "imageio.tap": ("tap", 4),
}

#: Violations allowed until the named step removes them:
#: (importer, imported module) -> the step.
ALLOWED: dict[tuple[str, str], str] = {
    # Phase 1 of issue 11 left none: daemon, proxy, control and tap import
    # from imageio.web, imageio.control and imageio.backends.httpclient.
    # Add entries here only with the issue step that removes them, e.g.
    # ("imageio.daemon.images", "imageio.web._channel"): "issue N: ...".
}


class NothingAllowedTests(SynchronousTestCase):
    def test_noAllowances(self) -> None:
        """
        No layer violation is tolerated: the allow-list is empty.
        """
        self.assertEqual(ALLOWED, {})


def moduleName(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def isPackage(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def isModule(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def importedModules(source: str, name: str) -> list[tuple[int, str]]:
    """
    @param source: The text of module C{name}.
    @return: C{(line, module)} for every C{imageio} module that it imports,
        wherever the import statement is (functions and C{TYPE_CHECKING}
        blocks included), in line order. C{from package import name}
        counts as importing C{package.name} when that is a module.
    """
    package = name if isPackage(name) else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.append((node.lineno, candidate if isModule(candidate) else source))
    return sorted((line, m) for line, m in found if m == "imageio" or m.startswith("imageio."))


def layerOf(name: str) -> tuple[str, int]:
    """
    @return: The layer's name and rank of module C{name}.
    @raise KeyError: For a top-level module no layer was chosen for.
    """
    for package, layer in PACKAGES.items():
        if name == package or name.startswith(package + "."):
            return layer
    if name in CORE:
        return ("core", 0)
    raise KeyError(f"{name}: no layer; add it to tests/test_layers.py and README.rst")


def violations(importer: str, imported: str) -> list[str]:
    """
    @return: Why C{importer} may not import C{imported} (empty if it may).
    """
    problems = []
    (importerLayer, importerRank), (importedLayer, importedRank) = (
        layerOf(importer),
        layerOf(imported),
    )
    if importedRank > importerRank:
        problems.append(f"layer {importerLayer} imports the higher layer {importedLayer}")
    elif importedRank == importerRank and importerRank == 3 and importerLayer != importedLayer:
        problems.append(f"{importerLayer} imports its sibling {importedLayer}")
    parts = imported.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            owner = ".".join(parts[:i])
            if not (importer == owner or importer.startswith(owner + ".")):
                problems.append(f"private module of {owner} imported from outside it")
                break
    return problems


def allViolations() -> dict[tuple[str, str], list[str]]:
    """
    @return: Every violation in C{imageio/}: C{(importer, imported)} to
        C{"file:line: reason"} texts.
    """
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = moduleName(path)
        for line, imported in importedModules(path.read_text(), importer):
            for reason in violations(importer, imported):
                where = f"{path.relative_to(ROOT)}:{line}: {importer} -> {imported}: {reason}"
                found.setdefault((importer, imported), []).append(where)
    return found


class LayerRuleTests(SynchronousTestCase):
    """
    The modules of C{imageio/} follow the layer rule.
    """

    def test_noNewViolations(self) -> None:
        """
        No module imports from a layer above its own, from a sibling
        application package, or a private module of another package, except
        for the violations in L{ALLOWED}.
        """
        found = allViolations()
        new = [w for key, where in sorted(found.items()) if key not in ALLOWED for w in where]
        self.assertEqual(new, [], "layer rule violations:\n" + "\n".join(new))

    def test_allowListShrinks(self) -> None:
        """
        Every entry of L{ALLOWED} is still a violation: fixed ones must be
        removed from the list.
        """
        found = allViolations()
        stale = [f"{a} -> {b} ({step})" for (a, b), step in ALLOWED.items() if (a, b) not in found]
        self.assertEqual(stale, [], "fixed, remove from ALLOWED:\n" + "\n".join(stale))

    def test_everyModuleHasALayer(self) -> None:
        """
        Every module of C{imageio/} belongs to a layer: a new top-level
        module needs a decision (here and in the README).
        """
        for path in PACKAGE.rglob("*.py"):
            layerOf(moduleName(path))


class CheckerTests(SynchronousTestCase):
    """
    The checker itself finds what it should.
    """

    def test_upwardImport(self) -> None:
        """
        A backend importing the web layer is a violation.
        """
        self.assertEqual(
            violations("imageio.backends.http", "imageio.web"),
            ["layer backends imports the higher layer web"],
        )

    def test_coreImportingBackends(self) -> None:
        """
        The core (tickets) importing a backend is a violation.
        """
        self.assertEqual(
            violations("imageio.tickets", "imageio.backends"),
            ["layer core imports the higher layer backends"],
        )

    def test_siblings(self) -> None:
        """
        The application packages may not import each other.
        """
        self.assertEqual(
            violations("imageio.proxy._site", "imageio.control"),
            ["proxy imports its sibling control"],
        )

    def test_privateModule(self) -> None:
        """
        A private module is importable only inside its package.
        """
        self.assertEqual(
            violations("imageio.daemon.images", "imageio.web._channel"),
            ["private module of imageio.web imported from outside it"],
        )
        self.assertEqual(violations("imageio.web._router", "imageio.web._channel"), [])
        self.assertEqual(violations("imageio.web._router", "imageio._log"), [])

    def test_importsEverywhere(self) -> None:
        """
        Imports inside functions and C{TYPE_CHECKING} blocks count, and
        C{from package import module} names the module.
        """
        source = (
            "from typing import TYPE_CHECKING\n"
            "from imageio import _log\n"
            "if TYPE_CHECKING:\n"
            "    from imageio.web._router import Router\n"
            "def f():\n"
            "    import imageio.proxy\n"
            "    from . import http\n"
        )
        self.assertEqual(
            importedModules(source, "imageio.backends.fake"),
            [
                (2, "imageio._log"),
                (4, "imageio.web._router"),
                (6, "imageio.proxy"),
                (7, "imageio.backends.http"),
            ],
        )


class LightImportTests(SynchronousTestCase):
    """
    Entry points load only what they need.
    """

    def test_ctlWithoutWeb(self) -> None:
        """
        C{imageio-ctl} (L{imageio.control.ctl}) starts without importing the
        web layer or twisted.web: publishing C{imageio.control}'s surface
        must not make the command line slow.
        """
        import subprocess
        import sys

        code = (
            "import sys, imageio.control.ctl; "
            "print(sorted(m for m in ('imageio.web', 'twisted.web.server') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        )
        self.assertEqual(out.stdout.strip(), "[]")
