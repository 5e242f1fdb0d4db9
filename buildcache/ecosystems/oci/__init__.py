"""OCI registries: the pull side of the distribution spec, cached."""
