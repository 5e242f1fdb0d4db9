"""
Debian ``apt``: which files of an apt repository are indexes and which are immutable.
"""
