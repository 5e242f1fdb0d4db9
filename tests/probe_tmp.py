from twisted.trial.unittest import TestCase
from twisted.internet import task
from tests.test_proxy import ProxyHarness, INDEX_PATH, ARCH_PATH, raw_connection, raw_request, log_events
from tests.support import reactor
import os

class Probe(TestCase):
    async def test_verified_package_client_gone(self):
        events = log_events(self)
        h = ProxyHarness.start(self, {"index_ttl": 0})
        await h.get(INDEX_PATH)
        path = f"{ARCH_PATH}/world-2.0-r0.apk"
        h.origin.hold(path)
        fds = len(os.listdir("/proc/self/fd"))
        c = await raw_connection(self, h.proxy_port)
        c.send(raw_request("GET", f"/up{path}", f"127.0.0.1:{h.proxy_port}"))
        await task.deferLater(reactor, 0.1)
        c.transport.abortConnection()
        await c.lost
        h.origin.release(path)
        await task.deferLater(reactor, 0.1)
        await h.idle()
        print([e.get("log_format") for e in events if e.get("log_level").name in ("error", "critical", "warn")])
        print(h.stored_keys(), fds, len(os.listdir("/proc/self/fd")))
