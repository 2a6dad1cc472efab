"""Spatial geometry for object catalogs: the Qserv grid (``Chunker``) and sky regions."""
