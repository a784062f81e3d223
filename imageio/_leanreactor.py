# -*- test-case-name: tests.test_leanreactor -*-
"""
Importing this module imports Twisted's reactor core without its
pyOpenSSL-based TLS support (L{imageio._twisted_lazytls.importReactorCore}),
unless something imported the core before, then C{twisted.web.server}
without Perspective Broker and the template system
(L{imageio._twisted_leanweb.importServer}). C{imageio.tap} imports it
before anything else that could import the core, so a daemon loads
pyOpenSSL and cryptography only when it makes a TLS client connection.
"""

from imageio._twisted_lazytls import importReactorCore
from imageio._twisted_leanweb import importServer

#: Whether importing this module imported the reactor core without TLS.
imported = importReactorCore()

#: Whether importing this module imported C{twisted.web.server} without
#: Perspective Broker and the template system
#: (L{imageio._twisted_leanweb.importServer}).
leanweb = importServer()
