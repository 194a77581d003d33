"""One client per upstream; each speaks HTTP and raises the typed errors of `errors.py`."""
