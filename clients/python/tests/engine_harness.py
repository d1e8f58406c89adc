"""An engine in a subprocess, for the provider tests: its JSON-line events,
its stderr, and a scan of its memory."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path


class Engine:
    def __init__(self, demo, script: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KTB_")}
        env.update(KTB_URL=demo.api, KTB_ACCOUNT=demo.account, KTB_CONSUMER_CREDENTIAL=demo.credential)
        self.proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.events: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_out(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def expect(self, pred, seconds: float = 30.0) -> dict:
        deadline = time.monotonic() + seconds
        seen = []
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(event)
            if pred(event):
                return event
        raise AssertionError(f"no such event; saw {seen}\nstderr:\n{''.join(self.stderr)[-3000:]}")

    def memory_holds(self, needle: bytes) -> bool:
        """Scans the engine's readable memory for `needle`."""
        found = False
        with open(f"/proc/{self.proc.pid}/maps") as maps, open(f"/proc/{self.proc.pid}/mem", "rb", 0) as mem:
            for line in maps:
                addr, perms = line.split()[:2]
                if not perms.startswith("r"):
                    continue
                start, end = (int(x, 16) for x in addr.split("-"))
                try:
                    mem.seek(start)
                    if needle in mem.read(end - start):
                        found = True
                        break
                except (OSError, ValueError, OverflowError):
                    continue
        return found

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
