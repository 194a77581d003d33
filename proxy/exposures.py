"""Exposure events of local experiment evaluation (`track=true`), through the official
`amplitude-analytics` SDK: one `[Experiment] Exposure` event per assigned flag, built by
`amplitude-experiment`'s own `to_exposure_events` (what Amplitude's local-evaluation SDKs send).

- **Once per user, flag and variant for 24 h.** Braze renders one message several times;
  each render asks for the variants, and only the first makes an event. The window is this
  process's memory (a bounded TTL set, `DEDUP_CAPACITY` keys per worker process), then, with
  `CCPROXY_REDIS_URL`, a Redis `SET NX EX 86400` shared by every worker and box. Without Redis
  each worker process dedups alone, so N workers may send up to N events for one exposure.
- **A stable `insert_id`**: a SHA-256 of the user id, device id, flag, variant and UTC day (no
  secret in it), so Amplitude itself drops a duplicate that got past the window (another box
  without Redis, a restart, an evicted key) within its 7-day insert_id window.
- **Transport**: the SDK's worker posts through `clients/analytics.py` (urllib3, explicit
  `CCPROXY_UPSTREAM_PROXY` only), never through the SDK's urllib client, which reads HTTP_PROXY.
- **Off the send path**: a request hashes and enqueues (a bounded queue; when full, the event
  is dropped and counted); one background thread (a greenlet under gevent, started by the
  first exposure, so after gunicorn's fork) does Redis and hands events to the SDK, whose own
  consumer thread and pool batch and retry them. `close()` (worker exit) flushes them.
- Nothing here is imported in the gunicorn master: the SDK loads ssl (via urllib).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from .clients.analytics import AnalyticsClient
from .errors import ProxyError, UpstreamTimeout

log = logging.getLogger("ccproxy")

DAY_SECONDS = 86400
# Keys remembered per process (about 150 bytes each); past it the oldest go first and the
# insert_id (and Redis, when configured) still keep Amplitude from counting twice.
DEDUP_CAPACITY = 100_000
QUEUE_CAPACITY = 10_000
REDIS_PREFIX = "ccproxy:exposure:"


@dataclass(frozen=True)
class Exposure:
    """One user's exposure to one flag's variant (as the engine or `/v1/vardata` gave it)."""

    user_id: str
    device_id: str
    flag: str
    variant: str
    value: Any = None
    payload: Any = None
    metadata: dict[str, Any] | None = None
    at: float = 0.0  # epoch seconds of the render

    def digest(self) -> str:
        """Who saw what: the dedup key (never the ids in clear)."""
        parts = (self.user_id, self.device_id, self.flag, self.variant)
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def insert_id(self) -> str:
        """Stable per user, flag, variant and UTC day: every box computes the same one."""
        day = int(self.at // DAY_SECONDS)
        return hashlib.sha256(f"{self.digest()}\x1f{day}".encode()).hexdigest()[:40]


class ExposureTracker:
    """This process's exposure pipeline: dedup, queue, the SDK client (built on first use)."""

    def __init__(self, client: AnalyticsClient, api_key: str, redis: Any = None,
                 timer: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 flush_interval: float = 10.0):
        self._client = client
        self._api_key = api_key
        self._redis = redis  # redis_backend.RedisHealth or None
        self._wall = wall
        self._flush_interval = flush_interval
        self._seen: TTLCache[str, bool] = TTLCache(DEDUP_CAPACITY, DAY_SECONDS, timer=timer)
        self._seen_lock = threading.Lock()
        self._queue: queue.Queue[Exposure | None] = queue.Queue(QUEUE_CAPACITY)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._sdk: Any = None
        self._closed = False
        # queued, duplicate (this process), shared_duplicate (Redis), dropped, sent, failed
        self.counts: Counter[str] = Counter()

    def track(self, exposures: list[Exposure]) -> None:
        """On the send path: remember and enqueue the new ones; never waits, never raises."""
        if self._closed:
            return
        fresh = []
        with self._seen_lock:
            for exposure in exposures:
                key = exposure.digest()
                if key in self._seen:
                    self.counts["duplicate"] += 1
                    continue
                self._seen[key] = True
                fresh.append((key, exposure))
        if not fresh:
            return
        self._start()
        for key, exposure in fresh:
            try:
                self._queue.put_nowait(exposure)
                self.counts["queued"] += 1
            except queue.Full:
                self.counts["dropped"] += 1
                with self._seen_lock:
                    self._seen.pop(key, None)  # a later render may try again

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="experiment-exposures",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send([e for e in batch if e is not None])
            except Exception:  # noqa: BLE001 - the pipeline must outlive a bad event
                log.exception("experiment exposures could not be handed to the SDK")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def _send(self, batch: list[Exposure]) -> None:
        batch = self._not_seen_elsewhere(batch)
        if not batch:
            return
        sdk = self._sdk_client()
        for event in self._events(batch):
            sdk.track(event)

    def _not_seen_elsewhere(self, batch: list[Exposure]) -> list[Exposure]:
        """With Redis: only the exposures no other process or box sent within 24 h."""
        if self._redis is None or not batch:
            return batch

        def claim() -> list[Any]:
            pipe = self._redis.client.pipeline(transaction=False)
            for exposure in batch:
                pipe.set(REDIS_PREFIX + exposure.digest(), b"1", nx=True, ex=DAY_SECONDS)
            return list(pipe.execute())

        claimed = self._redis.run(claim, default=None)
        if claimed is None:  # Redis unusable: this process's window and the insert_id remain
            return batch
        kept = [e for e, won in zip(batch, claimed, strict=True) if won]
        self.counts["shared_duplicate"] += len(batch) - len(kept)
        return kept

    def _events(self, batch: list[Exposure]) -> list[Any]:
        from amplitude_experiment import User, Variant
        from amplitude_experiment.exposure import DAY_MILLIS, to_exposure_events
        from amplitude_experiment.exposure import Exposure as SdkExposure

        events = []
        for e in batch:
            user = User(user_id=e.user_id or None, device_id=e.device_id or None)
            variant = Variant(key=e.variant, value=e.value if e.value is not None else e.variant,
                              payload=e.payload, metadata=e.metadata)
            for event in to_exposure_events(SdkExposure(user, {e.flag: variant}), DAY_MILLIS):
                event["insert_id"] = e.insert_id()
                event["time"] = int(e.at * 1000)
                events.append(event)
        return events

    def _sdk_client(self) -> Any:
        if self._sdk is None:
            self._sdk = sdk_client(self._api_key, self._post, self._callback, self._flush_interval)
        return self._sdk

    def _post(self, payload: dict[str, Any]) -> Any:
        """The SDK's transport: our client, its outcome in the SDK's Response type."""
        from amplitude.http_client import HttpStatus, Response

        try:
            status, body = self._client.post_events(payload)
        except ProxyError as error:
            failed = Response(HttpStatus.TIMEOUT if isinstance(error, UpstreamTimeout) else HttpStatus.FAILED,
                              {"error": error.message})
            return failed  # the SDK retries the batch with its backoff
        response = Response()
        response.code = int(body.get("code", status)) if str(body.get("code", "")).isdigit() else status
        response.status = Response.get_status(response.code)
        response.body = body
        return response

    def _callback(self, _event: Any, code: int, _message: str | None) -> None:
        self.counts["sent" if 200 <= code < 300 else "failed"] += 1

    def flush(self, timeout: float = 30.0) -> None:
        """Hand everything queued to the SDK and send it now (tests, worker exit)."""
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.01)
        if self._sdk is not None:
            for future in self._sdk.flush():
                if future is not None:
                    future.result(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Worker exit: stop taking exposures, send what is queued, stop the SDK's threads."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)
        if self._sdk is not None:
            self._sdk.shutdown()  # flushes and waits for the sends in flight
            storage = getattr(self._sdk, "destination_storage", None)
            if storage is not None:
                # Events whose last attempt failed are back in the buffer: lost with the process
                # (counted), never handed to a stopped pool; its consumer thread stops waiting.
                self.counts["lost_at_exit"] += len(storage.pull_all())
                with storage.lock:
                    storage.lock.notify_all()

    def state(self) -> dict[str, Any]:
        return {"queue": self._queue.qsize(), **dict(self.counts)}


def sdk_client(api_key: str, post: Callable[[dict[str, Any]], Any], callback: Callable[..., None],
               flush_interval: float) -> Any:
    """An `amplitude.Amplitude` client whose destination sends through `post`."""
    from amplitude import Amplitude, Config
    from amplitude.constants import EventLogLevel
    from amplitude.exception import InvalidAPIKeyError
    from amplitude.plugin import AmplitudeDestinationPlugin
    from amplitude.worker import Workers

    class ProxyWorkers(Workers):  # type: ignore[misc]
        """The SDK's batching and retries; our transport."""

        def send(self, events: list[Any]) -> None:
            res = post(json.loads(self.get_payload(events)))
            try:
                self.response_processor.process_response(res, events)
            except InvalidAPIKeyError:
                # The SDK raises before its callback: count them here, or the loss shows nowhere.
                log.error("Amplitude refused CCPROXY_AMPLITUDE_API_KEY; exposures are not recorded")
                for event in events:
                    callback(event, 400, "invalid API key")

    class Client(Amplitude):  # type: ignore[misc]
        destination_storage: Any = None

        def add(self, plugin: Any) -> Any:
            if type(plugin) is AmplitudeDestinationPlugin:
                plugin.workers = ProxyWorkers()  # before the SDK sets it up
                result = super().add(plugin)
                self.destination_storage = plugin.storage
                return result
            return super().add(plugin)

    # Each event's outcome at DEBUG only: ids stay out of the production log. Amplitude refuses
    # ids shorter than 5 characters by default; Experiment evaluated these very ids, so their
    # exposures must count too (`min_id_length` 1).
    config = Config(flush_interval_millis=max(1, int(flush_interval * 1000)), callback=callback,
                    logger=logging.getLogger("ccproxy.amplitude"), event_log_level=EventLogLevel.DEBUG,
                    min_id_length=1)
    return Client(api_key, config)
