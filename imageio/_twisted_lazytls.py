# -*- test-case-name: tests.test_leanreactor -*-
"""
Quarantine for the Twisted import-time TLS seam: a daemon that never makes
a TLS client connection does not load pyOpenSSL and cryptography.

Twisted's reactor core imports its pyOpenSSL-based TLS support eagerly:
C{twisted.internet.tcp} imports C{twisted.internet._newtls} (for
C{startTLS}), and C{twisted.internet.posixbase} imports
C{twisted.protocols.tls} and C{twisted.internet.ssl} (for C{connectSSL}
and C{listenSSL}). Each imports pyOpenSSL, which loads cryptography's Rust
extension with its own copy of OpenSSL: about 12 MiB of resident memory
that a daemon serving files and NBD exports never uses. Our TLS server
(L{imageio.web._tls}) uses the standard library's C{ssl}; pyOpenSSL is
needed only by the HTTP client (the C{https:} backend and the proxy),
which imports it itself, when it is first used.

L{importReactorCore} imports those two reactor modules with the three TLS
modules blocked, so both take their "no TLS support" branch, then unblocks
them, in a process that has not imported the reactor core yet: importing
L{imageio._leanreactor} does that, and C{imageio.tap}, run by C{twistd},
imports it first. It is a no-op anywhere else (tests, a reactor installed
before, C{twistd --reactor}). What it costs the process:

  - C{tcp.Connection} has no C{startTLS}: no imageio code uses it (our
    server transports refuse it; the HTTP client wraps its connections
    in C{TLSMemoryBIOFactory} through C{wrapClientTLS}, and
    C{twisted.internet.endpoints}, imported with it, imports
    C{twisted.protocols.tls} itself);
  - the reactor's C{connectSSL} and C{listenSSL} have no implementation
    until L{restoreReactorTLS} gives them back; the HTTP client calls it
    when it is imported.

The private names it relies on (C{PRIVATE_NAMES}, and the blocked modules
L{BLOCKED}) are pinned by C{tests.test_leanreactor}, which also starts a
real daemon to check that it idles without cryptography and still serves
an C{https:} ticket. A Twisted release that imports pyOpenSSL elsewhere in
the core makes that test fail, not the daemon.
"""

from __future__ import annotations

import sys

#: The modules through which the reactor core imports pyOpenSSL.
BLOCKED = ("twisted.internet._newtls", "twisted.protocols.tls", "twisted.internet.ssl")

#: The reactor core modules imported with L{BLOCKED} blocked.
CORE = ("twisted.internet.tcp", "twisted.internet.posixbase")

#: The private names used here, for the pinning tests: the module-level
#: names C{posixbase} binds to C{twisted.protocols.tls} and
#: C{twisted.internet.ssl}, or to L{None} when they cannot be imported.
PRIVATE_NAMES = (
    ("twisted.internet.posixbase", "tls"),
    ("twisted.internet.posixbase", "ssl"),
)


def importReactorCore() -> bool:
    """
    Import the reactor core (L{CORE}) without its pyOpenSSL-based TLS
    support, unless something imported the core or the TLS modules before.

    @return: C{True} if the core was imported here, without TLS support;
        C{False} if something imported it before, or if importing it
        without them failed (a later import then imports it whole).
    """
    if any(name in sys.modules for name in (*CORE, *BLOCKED, "twisted.internet.reactor")):
        return False
    for name in BLOCKED:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in CORE:
            __import__(name)
    except ImportError:
        # A Twisted release that needs one of them: import it as it is.
        return False
    finally:
        for name in BLOCKED:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return True


def restoreReactorTLS() -> None:
    """
    Give the reactor back C{connectSSL} and C{listenSSL} (and
    C{IReactorSSL}) if L{importReactorCore} left them out. This imports
    pyOpenSSL: call it only where a TLS client is about to be used.
    """
    from twisted.internet import posixbase

    if posixbase.tls is not None:  # type: ignore[attr-defined]
        return
    from twisted.internet import ssl
    from twisted.internet.interfaces import IReactorSSL
    from twisted.protocols import tls
    from zope.interface import classImplements

    posixbase.tls = tls  # type: ignore[attr-defined]
    posixbase.ssl = ssl  # type: ignore[attr-defined]
    classImplements(posixbase.PosixReactorBase, IReactorSSL)
