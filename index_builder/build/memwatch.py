"""memwatch: the peak resident memory of this process while a stage's task runs (the merge's)."""
from __future__ import annotations

import threading
import time


class MemoryWatch:
    """Peak anonymous and file-backed resident memory of this process while a merge runs, sampled
    from /proc/self/status (Linux; elsewhere nothing is recorded). Anonymous memory is what a merge
    holds; file-backed pages (the mmapped parts and .ivfdata) are page cache the kernel can drop."""

    PERIOD_S = 0.02

    def __enter__(self):
        self.peak = {"anon": 0, "file": 0}
        self.start = self._read()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _read(self) -> dict:
        try:
            with open("/proc/self/status") as f:
                kv = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
        except OSError:
            return {}
        return {"anon": int(kv["RssAnon"].split()[0]) << 10, "file": int(kv["RssFile"].split()[0]) << 10}

    def _run(self):
        while not self._stop.is_set():
            for k, v in self._read().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.PERIOD_S)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def record(self) -> dict:
        if not self.start:
            return {}
        mib = 2**20
        return {"rss_anon_start_mib": round(self.start["anon"] / mib, 1),
                "rss_anon_peak_mib": round(self.peak["anon"] / mib, 1),
                "rss_file_peak_mib": round(self.peak["file"] / mib, 1)}
