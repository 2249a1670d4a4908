"""Background adapter loading: adapters that queued requests name are read before their turn.

`AdapterLoader(store, workers)` runs `AdapterStore.get` (read, validate, scale, cast: the whole
load) in a pool of `workers` threads. Contract:
- `prefetch(wanted, needed)`: start loading the adapters of `wanted` (in order: the first the
  scheduler will reach first) that are neither cached, failed nor loading. The CPU cache budget
  (`max_cpu_loras`, a count) holds the loads in flight plus the cached adapters in `needed`
  (those queued or running requests use): no load starts that would push one of them out.
- `is_loading(name)`: a load of `name` is in flight. The scheduler skips such an adapter's
  requests (others run meanwhile) and admits them in their order once it is loaded.
- `get(name)`: the adapter's weights (`AdapterStore.get`), waiting for its load if one is in
  flight (never two reads of one adapter). An adapter not prefetched is read right there, in
  the engine step, as with `workers=0` (no pool: every load is synchronous, as before).
- `wait_any()`: block until some load finishes (a step with nothing to run but requests of
  adapters still loading).
- A failed load is remembered by the store (`AdapterStore.failed`): the adapter's requests fail
  with its source and reason when the scheduler reaches them; nothing else stops.
- `close()` cancels the loads not started and returns at once; a read already running finishes
  in its thread (its result lands in the store and is unused).
Only the engine's thread calls these methods; the store locks what the threads share.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from .adapter_store import AdapterStore
from .adapters import LoraWeights
from .errors import AdapterError

WAIT_SLICE = 0.1  # seconds per wait, so a stop signal is handled promptly whatever the platform


@dataclass
class LoaderStats:
    background_loads: int = 0  # loads finished in the pool (failed ones included)
    load_seconds: float = 0.0  # their total duration
    wait_seconds: float = 0.0  # time the engine's thread waited for a load in flight
    wait_steps: int = 0  # steps with nothing to run because only adapters still loading were waiting

    @property
    def hidden_seconds(self) -> float:
        """Background load time the engine did not wait for (it ran other requests meanwhile)."""
        return max(0.0, self.load_seconds - self.wait_seconds)


class AdapterLoader:
    def __init__(self, store: AdapterStore, workers: int):
        self.store = store
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loracli-adapter-load") if workers else None
        self._loading: dict[str, Future[float]] = {}
        self.stats = LoaderStats()

    def prefetch(self, wanted: Iterable[str], needed: set[str]) -> None:
        """Start background loads of `wanted` in order, within the CPU cache budget (see the module doc)."""
        if self._pool is None:
            return
        self._reap()
        cached = self.store.cached_names()
        room = self.store.max_cpu_loras - len(self._loading) - len(cached & needed)
        for name in wanted:
            if room <= 0:
                break
            if name in self._loading or name in cached or not self.store.has(name) or self.store.settled(name):
                continue
            try:
                self._loading[name] = self._pool.submit(self._load, name)
            except RuntimeError:  # the pool was shut down (`close`)
                return
            room -= 1

    def is_loading(self, name: str) -> bool:
        future = self._loading.get(name)
        return future is not None and not future.done()

    def get(self, name: str, *, count_hit: bool = True) -> LoraWeights:
        """`AdapterStore.get`, after the load of `name` in flight (if any) is done."""
        future = self._loading.get(name)
        if future is not None and not future.done():
            t0 = time.perf_counter()
            _wait([future])
            self.stats.wait_seconds += time.perf_counter() - t0
        return self.store.get(name, count_hit=count_hit)

    def wait_any(self) -> bool:
        """Wait for one load in flight to finish (a step with nothing else to do); False if none is."""
        pending = [f for f in self._loading.values() if not f.done()]
        if not pending:
            return False
        t0 = time.perf_counter()
        _wait(pending)
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.wait_steps += 1
        return True

    def snapshot(self) -> LoaderStats:
        """The stats, counting the loads finished by now."""
        self._reap()
        return self.stats

    def close(self) -> None:
        """Cancel the loads not started; do not wait for those running (see the module doc)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, name: str) -> float:
        """In a pool thread: the whole load of `name` into the store; its duration in seconds."""
        t0 = time.perf_counter()
        try:
            self.store.get(name, count_hit=False)
        except AdapterError:
            pass  # remembered in `store.failed`: the adapter's requests fail when the scheduler reaches them
        return time.perf_counter() - t0

    def _reap(self) -> None:
        """Forget finished loads, counting them. One that raised more than an AdapterError (a bug) is
        forgotten too: the engine's own `get` then reads the adapter again and raises it there."""
        for name, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[name]
            if not future.cancelled() and future.exception() is None:
                self.stats.background_loads += 1
                self.stats.load_seconds += future.result()


def _wait(futures: list[Future]) -> None:
    """Until one of `futures` is done, in short slices (a signal handler runs between them)."""
    while not wait(futures, timeout=WAIT_SLICE, return_when=FIRST_COMPLETED).done:
        pass
