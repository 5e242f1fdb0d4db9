"""
The OCI registry ecosystem (issue 14): a pull-through cache of container
registries on ``--registry-port``.

- :mod:`.names`: the ``/v2/`` URL space, name grammar, upstream selection,
  store keys;
- :mod:`.policy`: the engine's rules (kinds, digests, ``Accept``);
- :mod:`.errors`: the spec's JSON errors;
- :mod:`.registry`: the front end;
- :mod:`.auth`: the token agent for upstream registries.
"""
