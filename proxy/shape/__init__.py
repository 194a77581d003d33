"""Pure reshaping of upstream JSON into flat, Liquid-friendly dicts (no I/O, no Flask)."""
