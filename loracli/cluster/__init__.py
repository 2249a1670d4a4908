"""`loracli run --ray`: engine replicas on a Ray cluster (`pool.RayPool`), requests routed by
adapter affinity (`routing.py`), one engine per worker (`worker.EngineWorker`). Ray is imported
only when a pool starts."""
