"""
The cache engine: lookup, the freshness decision, revalidation, stale
serving, the miss through the fetcher, and the response.
"""
