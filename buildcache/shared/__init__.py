"""
The shared object-store tier behind each node's disk (issue 15).
"""
