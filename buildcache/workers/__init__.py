"""
The processes of ``--workers N``: the pool the main process runs
(:mod:`buildcache.workers.pool`), the hit worker itself
(:mod:`buildcache.workers.child`) and the control channel between them
(:mod:`buildcache.workers.control`).  See docs/workers.md.

The package sits above :mod:`buildcache.service`: a worker builds the same
:class:`buildcache.service.Server` (in hits-only mode), and the pool wraps
the service :func:`buildcache.service.service_for_twistd` makes.
"""
