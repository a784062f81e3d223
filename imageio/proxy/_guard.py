# -*- test-case-name: tests.test_proxy -*-
"""
Where the proxy may connect: never to its own host, whatever a ticket says.

The ticket verifier refuses daemon addresses that are loopback, link-local,
multicast or unspecified IP literals, and C{localhost}. A host I{name} can
still resolve to such an address (by mistake, or by DNS rebinding), so the
proxy's HTTP client resolves names itself and drops those addresses before
connecting (reliability checklist I.44). Loopback is allowed only when the
proxy is configured for it (tests, all-in-one labs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import define, frozen
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from imageio._log import Logger
from imageio.backends import ipAddress

log = Logger()


def isAllowedAddress(host: str, allowLoopback: bool) -> bool:
    """
    @param host: An IP address (IPv6 possibly with a zone).
    @return: Whether the proxy may connect to it.
    """
    address = ipAddress(host)
    if address is None:
        return False
    if address.is_link_local or address.is_multicast or address.is_unspecified:
        return False
    if address.is_loopback:
        return allowLoopback
    return True


@implementer(IResolutionReceiver)
@define
class _FilteringReceiver:
    receiver: IResolutionReceiver
    hostName: str
    allowLoopback: bool

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self.receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", "")
        if isAllowedAddress(host, self.allowLoopback):
            self.receiver.addressResolved(address)
        else:
            log.warn(
                "Refusing to connect to {address} (host {host}): loopback, link-local, "
                "multicast and unspecified addresses are not daemons "
                "(loopback is allowed with [proxy] allow_loopback = true)",
                address=host,
                host=self.hostName,
            )

    def resolutionComplete(self) -> None:
        self.receiver.resolutionComplete()


@implementer(IHostnameResolver)
@frozen
class GuardedResolver:
    """
    A name resolver that drops the addresses L{isAllowedAddress} refuses.
    """

    resolver: IHostnameResolver
    allowLoopback: bool

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        receiver = _FilteringReceiver(resolutionReceiver, hostName, self.allowLoopback)
        resolution: IHostResolution = self.resolver.resolveHostName(
            receiver, hostName, portNumber, addressTypes, transportSemantics
        )
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor:
    """
    The reactor, seen through another name resolver (what
    L{HostnameEndpoint} uses).
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("The guarded resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """
    Endpoints for an L{twisted.web.client.Agent}: TCP (and TLS for
    C{https}) to the addresses of the URL's host that are allowed.
    """

    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS, connectTimeout: float, allowLoopback: bool
    ) -> None:
        resolver = GuardedResolver(reactor.nameResolver, allowLoopback)
        self._reactor = _ResolvingReactor(reactor, resolver)
        self._policy = policy
        self._connectTimeout = connectTimeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, timeout=self._connectTimeout
        )
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return endpoint
