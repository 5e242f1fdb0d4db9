"""
Operations: the status page and its data, metrics, logs and the ``buildcache`` command.

Ops sits beside the service at the top: it observes the engine and the
fetcher through their observer interfaces, and nothing below imports it.
"""
