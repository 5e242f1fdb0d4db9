"""
The proxy port's front end (router, resource, ``CONNECT`` tunnel) and the
connection handling both ports share (channel, connection cap, sites).
"""
