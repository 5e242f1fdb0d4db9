"""
The proxy port: its router, its resource and the CONNECT tunnel.
"""
