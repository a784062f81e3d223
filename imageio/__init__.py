# -*- test-case-name: tests.test_layers -*-
"""
imageio: move virtual-machine disk images between storage and clients.

A Twisted implementation of the oVirt image I/O service: a per-host daemon
serving C{/images/<ticket>} over HTTPS and a local UNIX socket, a tickets
control API for the management agent, and an engine-side proxy.
"""

__version__ = "0.5.0"
