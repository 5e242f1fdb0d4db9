"""
Alpine ``apk``: APKINDEX parsing, package checks against the index.
"""
