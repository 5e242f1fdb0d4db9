"""
buildcache as a twistd application file: ``twistd -ny buildcache.tac``.

It runs the same service as ``twistd buildcache``; options come from the
environment variable BUILDCACHE_ARGS, split as a shell would, e.g.
``BUILDCACHE_ARGS="--max-size 20G --port tcp:8899:interface=127.0.0.1"``.
"""

import os
import shlex

from twisted.application.service import Application
from twisted.internet import reactor
from twisted.python.usage import UsageError

from buildcache.options import Options
from buildcache.workers.pool import service_for_twistd

options = Options()
try:
    options.parseOptions(shlex.split(os.environ.get("BUILDCACHE_ARGS", "")))
except UsageError as error:
    raise SystemExit(f"BUILDCACHE_ARGS: {error}") from None
if options.config.log_format == "json":
    # twistd reads --logger only from its own command line, which a .tac
    # cannot see: say so rather than log text while claiming JSON.
    raise SystemExit(
        "BUILDCACHE_ARGS: --log-format json works with `twistd buildcache`;"
        " with a .tac, pass twistd --logger=buildcache.ops.logs.json_observer"
    )

application = Application("buildcache")
service_for_twistd(options.config, reactor).setServiceParent(application)
