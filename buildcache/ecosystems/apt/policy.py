"""
Debian apt archives through the proxy: which files change under a fixed
name (the suite metadata under ``dists/``) and which never do (``pool/``
files, ``by-hash`` digests).  Everything else about them is plain HTTP:
the policy is the generic one with these rules.
"""

from __future__ import annotations

from buildcache.engine.freshness import Kind
from buildcache.engine.policy import GenericPolicy, PathRule, rule

__all__ = ["RULES", "APT"]

#: First matching row wins: ``by-hash`` before the ``dists`` index row.
RULES: tuple[PathRule, ...] = (
    # by-hash/<algo>/<digest>: the file name is its own checksum.
    rule(r"(?:^|/)by-hash/[A-Za-z0-9]+/[^/]+$", Kind.IMMUTABLE),
    # pool files are versioned by name and never replaced.
    rule(
        r"(?:^|/)pool/(?:[^/]+/)*[^/]+\.(?:deb|udeb|dsc|diff\.gz|tar\.[A-Za-z0-9]+)$",
        Kind.IMMUTABLE,
    ),
    # suite metadata changes under a fixed name.
    rule(
        r"(?:^|/)dists/(?:[^/]+/)+"
        r"(?:InRelease|Release|Release\.gpg|Packages[^/]*|Sources[^/]*"
        r"|Translation-[^/]+|Contents-[^/]+|[^/]+\.diff/Index)$",
        Kind.INDEX,
    ),
)

#: The apt policy.
APT = GenericPolicy(RULES)
