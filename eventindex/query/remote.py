"""A client of ``/v1/queries``: submit, status, result and cancel over HTTP.

Answers are the same dictionaries the service sends (``QueryRecord.to_dict()``
shape), so the command line prints local and remote queries alike. Error
answers become ``ServiceError`` carrying the problem's title and detail.
"""

from __future__ import annotations

from typing import Any

import httpx

from eventindex.query.client import DEFAULT_TIMEOUT_S, ServiceError


def _problem_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return f"{body.get('title', response.reason_phrase)}: {body['detail']}"
    return " ".join(response.text.split())[:200] or response.reason_phrase


class QueryServiceClient:
    """Asynchronous queries through ``{url}/v1/queries`` with a bearer ``token``.

    ``http`` replaces the underlying ``httpx.Client`` (tests pass an in-process one).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        http: httpx.Client | None = None,
    ) -> None:
        if http is None and not url.startswith(("http://", "https://")):
            raise ServiceError(f"--url must start with http:// or https://, not {url!r}")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._headers = headers
        self._owned = http is None

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(
                method, f"/v1/queries{path}", headers=self._headers, **kwargs
            )
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach the web service: {exc}") from exc
        if response.status_code >= 400:
            raise ServiceError(_problem_text(response), response.status_code)
        return response

    def submit(self, sql: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", "", json={"sql": sql}).json()
        return answer

    def status(self, query_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", f"/{query_id}").json()
        return answer

    def result(self, query_id: str, fmt: str) -> bytes:
        return self._call("GET", f"/{query_id}/results", params={"format": fmt}).content

    def cancel(self, query_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("DELETE", f"/{query_id}").json()
        return answer

    def close(self) -> None:
        if self._owned:
            self._http.close()
