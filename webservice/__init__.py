"""The HTTP service (FastAPI): thin routes over the Reader and the catalog.

``webservice.app.create_app(settings)`` builds it; ``eventindex serve`` runs it
under uvicorn. OpenAPI with examples at ``/docs`` (schema at ``/openapi.json``).

Routes (``/v1``)::

    GET  /v1/health                   status, version, collections (503 if the catalog fails)
    GET  /v1/events/{run}/{event}     one event and every copy of it (404 if absent)
    POST /v1/events/lookup            many events: results in order, found, missing
    POST /v1/events/select            a run range, streamed as application/x-ndjson
    GET  /v1/files/{guid}/events      every event of one file, with positions
    GET  /v1/datasets                 datasets with files, rows, bytes
    GET  /v1/datasets/{name}          one dataset and its files
    POST /v1/admin/refresh            re-read the catalog now (bearer token)
    GET  /metrics                     Prometheus text format

Decisions: every error is RFC 9457 ``application/problem+json`` whose ``type`` is
``urn:eventindex:problem:<kind>`` (``about:blank`` for plain HTTP errors) and
whose ``errors`` lists each bad field (``field``, ``location``, ``detail``,
``code``). Malformed JSON is 400, invalid values 422, a body over the limit or a
lookup over its list limit 413, a body that is not JSON 415, an unknown
collection 404. Limits are ``[webservice]`` settings (``eventindex.config.WebServiceSettings``).
"""
