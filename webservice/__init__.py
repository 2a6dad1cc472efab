"""The HTTP service (FastAPI): picking, lookups, trigger counts, cones, async queries."""
