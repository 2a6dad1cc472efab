"""A client of the web service's event routes, answering as the Reader does.

``EventIndexClient(url).pick(...)`` and ``.lookup(...)`` return the same
``PickedEvent`` objects as ``Reader``, so the command line prints local and
remote answers alike. Transport failures and error answers become
``ServiceError`` with one line saying what happened (the problem+json title
and detail when the server sent one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from eventindex.errors import EventIndexError
from eventindex.query.reader import PickedEvent

DEFAULT_TIMEOUT_S = 60.0


class ServiceError(EventIndexError):
    """The web service could not be reached, or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _problem(response: httpx.Response) -> str:
    """The title and detail of a problem+json answer, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("title") or body.get("detail")):
        parts = [str(body[k]) for k in ("title", "detail") if body.get(k)]
        return ": ".join(parts)
    text = " ".join(response.text.split())
    return text[:200] or response.reason_phrase


def _names_fields(response: httpx.Response) -> bool:
    """Whether a problem answer blames request fields (a 404 for an unknown collection
    does; one for an absent event does not)."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("errors"))


class EventIndexClient:
    """Picks and looks up events through ``{url}/v1``; a bearer ``token`` if given."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ServiceError(f"--url must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceError(f"{self.url}: no answer in time ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise ServiceError(f"cannot reach the service at {self.url}: {reason}") from exc

    def _fail(self, response: httpx.Response) -> ServiceError:
        return ServiceError(
            f"{self.url} answered {response.status_code}: {_problem(response)}",
            response.status_code,
        )

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ServiceError(f"{response.url} answered with invalid JSON: {exc}") from exc

    def pick(
        self,
        run_number: int,
        event_number: int,
        *,
        collection: str | None = None,
        formats: Iterable[str] | None = None,
        dataset_pattern: str | None = None,
    ) -> PickedEvent | None:
        """``GET /v1/events/{run}/{event}``: the event, or ``None`` when the service
        answers 404 for the event itself (not for one of the request's fields)."""
        params: dict[str, Any] = {}
        if collection is not None:
            params["collection"] = collection
        if formats:
            params["format"] = list(formats)
        if dataset_pattern is not None:
            params["dataset"] = dataset_pattern
        response = self._request("GET", f"/v1/events/{run_number}/{event_number}", params=params)
        if response.status_code == httpx.codes.NOT_FOUND and not _names_fields(response):
            return None
        if response.status_code != httpx.codes.OK:
            raise self._fail(response)
        return self._event(self._json(response))

    def lookup(
        self,
        keys: Sequence[tuple[int, int]],
        *,
        collection: str | None = None,
        formats: Iterable[str] | None = None,
        dataset_pattern: str | None = None,
    ) -> list[PickedEvent | None]:
        """``POST /v1/events/lookup``: one answer per key, in order (``None`` if missing)."""
        body = {
            "collection": collection,
            "events": [[run, event] for run, event in keys],
            "formats": list(formats) if formats else None,
            "dataset": dataset_pattern,
        }
        response = self._request("POST", "/v1/events/lookup", json=body)
        if response.status_code != httpx.codes.OK:
            raise self._fail(response)
        answer = self._json(response)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(keys):
            raise ServiceError(
                f"{self.url}: a lookup of {len(keys)} events must answer with a 'results' "
                "list of as many entries"
            )
        return [None if item is None else self._event(item) for item in results]

    def _event(self, data: Any) -> PickedEvent:
        try:
            return PickedEvent.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"{self.url}: unexpected event in the answer: {exc!r}") from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EventIndexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
