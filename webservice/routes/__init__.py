"""The route layer: each route parses its input, calls the Reader or the catalog, returns.

Every router carries its full prefix (``/v1/...``), so the route a request
matched names the whole path template, which the metrics use as a label.
"""

API_PREFIX = "/v1"
