"""
The twistd plugin of buildcache: ``twistd buildcache [options]``.

twistd imports every module in twisted/plugins/ when it scans for plugins,
so this one only declares the plugin: the reactor and the server code are
imported when the service is made.
"""

from __future__ import annotations

import attrs
from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import IPlugin
from zope.interface import implementer

from buildcache.options import Options


@implementer(IServiceMaker, IPlugin)
@attrs.frozen
class BuildcacheServiceMaker:
    """
    Makes the buildcache service from parsed :class:`Options`.
    """

    tapname: str = "buildcache"
    description: str = (
        "Caching proxy and pip index for Alpine apk, Debian apt and pip downloads."
    )
    options: type[Options] = Options

    def makeService(self, options: Options) -> MultiService:
        from twisted.internet import reactor

        from buildcache.workers.pool import service_for_twistd

        return service_for_twistd(options.config, reactor)


serviceMaker = BuildcacheServiceMaker()
