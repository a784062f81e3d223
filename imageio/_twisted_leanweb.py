# -*- test-case-name: tests.test_leanreactor -*-
"""
Quarantine for the import-time seam of C{twisted.web.server}: a daemon
imports it without Perspective Broker and the template system.

C{twisted.web.server} imports, for code paths the images API never takes:

  - C{twisted.spread.pb}, for C{Copyable} (a base class of its C{Request},
    so that a request can be copied over Perspective Broker) and
    C{ViewPoint}; with it C{twisted.spread.jelly} and C{banana},
    C{twisted.cred} and C{decimal};
  - C{twisted.web.util}, for the HTML of its own error pages
    (C{util._PRE}, C{util.formatFailure}), which imports
    C{twisted.web.template}: C{xml.sax} with C{pyexpat}, C{hyperlink} with
    C{idna}, C{twisted.python.urlpath}.

Together about 3 MiB of resident memory in an idle daemon (issue 12).
L{importServer} imports C{twisted.web.server} with two stand-ins in
C{sys.modules} and removes them afterwards, in a process that has not
imported it yet: C{twisted.web.util} becomes a module that imports the
real one on first attribute access (so Twisted's error pages still work),
and C{twisted.spread.pb} provides an empty C{Copyable} class and a
C{ViewPoint} that imports the real one when called. What it costs: a
C{twisted.web.server.Request} is not a Perspective Broker C{Copyable}
(nobody serves Twisted Web requests over PB here). Importing
C{twisted.spread.pb} or C{twisted.web.util} later imports the real
modules, as usual.

The names C{twisted.web.server} takes from the two modules
(L{SPREAD_NAMES}, L{UTIL_NAMES}) are pinned by C{tests.test_leanreactor},
which also checks that a real daemon idles without them. It is a no-op
anywhere C{twisted.web.server} was imported before (tests, other
programs).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: The module whose import is made lean.
SERVER = "twisted.web.server"

#: What C{twisted.web.server} imports from C{twisted.spread.pb}.
SPREAD_NAMES = ("Copyable", "ViewPoint")

#: What C{twisted.web.server} uses of C{twisted.web.util}, always as
#: C{util.<name>} inside functions.
UTIL_NAMES = ("_PRE", "formatFailure")

#: Modules C{twisted.web.server} imports that are imported for real
#: before the stand-ins go in, so that only its own body sees them.
_FIRST = (
    "twisted.web.http",
    "twisted.web.iweb",
    "twisted.web.resource",
    "twisted.web.error",
    "twisted.python.components",
    "twisted.python.reflect",
)


class _LazyModule(types.ModuleType):
    """
    Stands for module C{__name__}: the real one is imported when an
    attribute is first asked for.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__name__), name)


class _Copyable:
    """
    Stands for C{twisted.spread.flavors.Copyable} as a base class of
    C{twisted.web.server.Request}.
    """


def _viewPoint(*args: Any, **kwargs: Any) -> Any:
    from twisted.spread.pb import ViewPoint

    return ViewPoint(*args, **kwargs)


def importServer() -> bool:
    """
    Import C{twisted.web.server} without C{twisted.spread} and
    C{twisted.web.template}, unless something imported it (or them) first.

    @return: C{True} if it was imported here, with the stand-ins.
    """
    if any(name in sys.modules for name in (SERVER, "twisted.spread.pb", "twisted.web.util")):
        return False
    for name in _FIRST:
        importlib.import_module(name)
    spread = types.ModuleType("twisted.spread.pb")
    spread.Copyable = _Copyable  # type: ignore[attr-defined]
    spread.ViewPoint = _viewPoint  # type: ignore[attr-defined]
    standIns = {"twisted.spread.pb": spread, "twisted.web.util": _LazyModule("twisted.web.util")}
    web = sys.modules["twisted.web"]
    sys.modules.update(standIns)
    try:
        importlib.import_module(SERVER)
    finally:
        for name, module in standIns.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        # The import system binds a submodule on its package; no stand-in
        # may stay there.
        if getattr(web, "util", None) is standIns["twisted.web.util"]:
            del web.util  # type: ignore[attr-defined]
    return True
