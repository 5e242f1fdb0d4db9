"""
Package formats, one package each: the rules an ecosystem gives the engine
(keys, kinds, freshness of its own files, expected sizes and digests,
verifiers) and, for an ecosystem with its own URL space, its front end.
"""
