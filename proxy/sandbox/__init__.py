"""Sandbox upstreams: small real HTTP servers that answer like the documented APIs.

Used by `ccproxy demo` and by the tests. Each module builds a Flask app from the
seed documents' examples plus deterministic data for any other id.
"""
