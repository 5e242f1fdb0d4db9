"""
Fetching from upstreams: single flight, the download, guarded connections.
"""
