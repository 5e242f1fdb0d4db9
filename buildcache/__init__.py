"""
buildcache: one Twisted caching server for build boxes.

An HTTP forward proxy with mirror routes for Alpine apk and Debian apt, and a
PEP 503/691 simple index for pip and uv, sharing one on-disk store.  This
package owns the code; the twistd plugin lives in
``twisted/plugins/buildcache_plugin.py``.
"""

__version__ = "0.1.0"
