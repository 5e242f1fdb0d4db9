"""
Where an IP address leads: :func:`classify_address` sorts an IPv4 or IPv6
address into an :class:`AddressClass` (public, loopback, private,
link-local, ...), seeing through the IPv6 forms that carry an IPv4 address.
The access rules (:mod:`buildcache.access`) decide what each class may
reach; this module only names it, without any network I/O.
"""

from __future__ import annotations

import enum
import ipaddress

__all__ = [
    "AddressClass",
    "IPAddress",
    "IPNetwork",
    "classify_address",
    "parse_address",
    "unmapped",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressClass(enum.Enum):
    """Where an IP address leads."""

    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    MULTICAST = "multicast"
    RESERVED = "reserved"
    UNSPECIFIED = "unspecified"


_net = ipaddress.ip_network

#: Checked in order, first match wins; anything else is PUBLIC.  Explicit
#: tables rather than ipaddress's is_private/is_global, whose answers have
#: changed between Python releases.
_IPV4_CLASSES: tuple[tuple[IPNetwork, AddressClass], ...] = (
    (_net("0.0.0.0/32"), AddressClass.UNSPECIFIED),
    # "This network": Linux connects 0.0.0.0 to the local host.
    (_net("0.0.0.0/8"), AddressClass.RESERVED),
    (_net("10.0.0.0/8"), AddressClass.PRIVATE),
    # Carrier-grade NAT: shared with the ISP's other customers.
    (_net("100.64.0.0/10"), AddressClass.PRIVATE),
    (_net("127.0.0.0/8"), AddressClass.LOOPBACK),
    # Includes the cloud metadata service 169.254.169.254.
    (_net("169.254.0.0/16"), AddressClass.LINK_LOCAL),
    (_net("172.16.0.0/12"), AddressClass.PRIVATE),
    (_net("192.0.0.0/24"), AddressClass.RESERVED),
    (_net("192.0.2.0/24"), AddressClass.RESERVED),
    (_net("192.88.99.0/24"), AddressClass.RESERVED),
    (_net("192.168.0.0/16"), AddressClass.PRIVATE),
    (_net("198.18.0.0/15"), AddressClass.RESERVED),
    (_net("198.51.100.0/24"), AddressClass.RESERVED),
    (_net("203.0.113.0/24"), AddressClass.RESERVED),
    (_net("224.0.0.0/4"), AddressClass.MULTICAST),
    # Class E and the limited broadcast 255.255.255.255.
    (_net("240.0.0.0/4"), AddressClass.RESERVED),
)

_IPV6_CLASSES: tuple[tuple[IPNetwork, AddressClass], ...] = (
    (_net("::/128"), AddressClass.UNSPECIFIED),
    (_net("::1/128"), AddressClass.LOOPBACK),
    # Local-use NAT64 (RFC 8215), inside ::/8.
    (_net("64:ff9b:1::/48"), AddressClass.PRIVATE),
    # IPv4-compatible (deprecated) and the rest of ::/8; the IPv4-mapped,
    # -translated and well-known NAT64 ranges are handled before this table.
    (_net("::/8"), AddressClass.RESERVED),
    (_net("100::/64"), AddressClass.RESERVED),
    (_net("2001:db8::/32"), AddressClass.RESERVED),
    # IETF protocol assignments, Teredo (2001::/32) included.
    (_net("2001::/23"), AddressClass.RESERVED),
    (_net("3fff::/20"), AddressClass.RESERVED),
    (_net("fc00::/7"), AddressClass.PRIVATE),
    (_net("fe80::/10"), AddressClass.LINK_LOCAL),
    # Deprecated site-local: private in intent.
    (_net("fec0::/10"), AddressClass.PRIVATE),
    (_net("ff00::/8"), AddressClass.MULTICAST),
    (_net("2000::/3"), AddressClass.PUBLIC),
)

_IPV4_TRANSLATED = _net("::ffff:0:0:0/96")
_NAT64_WELL_KNOWN = _net("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """
    The IPv4 address an IPv6 address stands for, when packets to it end up
    there: IPv4-mapped, IPv4-translated (SIIT), NAT64 well-known prefix,
    6to4.
    """
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _IPV4_TRANSLATED or address in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def parse_address(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.ip_address(text)


def unmapped(address: IPAddress) -> IPAddress:
    """The same socket endpoint: ``::ffff:a.b.c.d`` is ``a.b.c.d``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def classify_address(ip: str | IPAddress) -> AddressClass:
    """
    Classify an IPv4 or IPv6 address (brackets allowed around IPv6).

    IPv6 forms that carry an IPv4 address (mapped ``::ffff:a.b.c.d``,
    translated, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) take the class
    of the embedded address when it is not public: ``2002:7f00:1::`` is as
    good as loopback to anyone who can get it delivered.

    :raise ValueError: ``ip`` is not an IP address.
    """
    address = parse_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return classify_address(embedded)
        table = _IPV6_CLASSES
        default = AddressClass.RESERVED  # outside 2000::/3 nothing is allocated
    else:
        table = _IPV4_CLASSES
        default = AddressClass.PUBLIC
    for network, address_class in table:
        if address in network:
            return address_class
    return default
