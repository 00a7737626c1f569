"""Files in and out: ``read`` (PyAV decode, image folders), ``write`` (H.264 + audio, PNG frames),
``outputs`` (atomic writes, staging, folder swap: every write goes through it), ``cache`` (the
inversion cache), ``caches`` (the cache root and every cache kind: sizes, clear, prune),
``checkpoint`` (resumable state), ``progress`` (stage timings, JSON-lines events), ``samples``
(synthetic clips)."""
