"""Who may associate: the called AE title and the calling AE allow list (``HRCT_ALLOWED_AETS``).

An entry is ``AE`` (any host) or ``AE@host``: that AE title only from that host. Host names are
resolved once, when the listener starts, so a slow DNS server never delays an association; an
address that changes needs a listener restart (or an IP address in the entry).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

log = logging.getLogger("hrct.listener")


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused, and the A-ASSOCIATE-RJ fields (PS3.8 9.3.4) that say so."""

    reason: str
    result: int
    source: int
    diagnostic: int


@dataclass(frozen=True)
class AccessPolicy:
    called_ae: str
    # calling AE title -> addresses it may come from (None: any address)
    allowed: dict[str, frozenset[str] | None]

    @classmethod
    def from_settings(cls, ae_title: str, allowed_aets: list[str]) -> AccessPolicy:
        allowed: dict[str, frozenset[str] | None] = {}
        for entry in allowed_aets:
            title, _, host = entry.partition("@")
            title = title.strip()
            if not host.strip():
                allowed[title] = None
                continue
            if title in allowed and allowed[title] is None:
                continue  # an unrestricted entry for the same title wins
            addresses = _resolve(host.strip())
            allowed[title] = (allowed.get(title) or frozenset()) | addresses
        return cls(ae_title.strip(), allowed)

    def check(self, calling_ae: str, called_ae: str, peer_address: str) -> Rejection | None:
        """None when the association may proceed, else why not."""
        calling_ae, called_ae = calling_ae.strip(), called_ae.strip()
        if called_ae != self.called_ae:
            # rejected-permanent, by the service user, called AE title not recognised
            return Rejection(f"called AE {called_ae!r} is not {self.called_ae!r}", 1, 1, 7)
        if not self.allowed:
            return None
        if calling_ae not in self.allowed:
            # rejected-permanent, by the service user, calling AE title not recognised
            return Rejection(f"calling AE {calling_ae!r} not in HRCT_ALLOWED_AETS", 1, 1, 3)
        hosts = self.allowed[calling_ae]
        if hosts is not None and _normalise(peer_address) not in hosts:
            return Rejection(f"calling AE {calling_ae!r} not allowed from {peer_address}", 1, 1, 3)
        return None


def _normalise(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def _resolve(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as error:
        log.error("HRCT_ALLOWED_AETS host %r does not resolve (%s); nobody matches it", host, error)
        return frozenset()
    return frozenset(_normalise(str(info[4][0])) for info in infos)
