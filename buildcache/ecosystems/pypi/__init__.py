"""
pip and uv: the PEP 503/691 simple index on ``--pypi-port``.
"""
