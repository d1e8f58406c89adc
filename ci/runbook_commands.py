"""Runs every runbook command that needs no cluster, as an operator would.

Extracts the ```bash ci blocks of proto-docs/runbooks.md and runs each with
`bash -euo pipefail` against a real broker and simulator on loopback, in a
directory holding what the runbook's commands expect: new-api-key and
new-api-secret (a replacement key), and ADMIN / KTB_CONFIG in the environment.
A block that fails (or prints nothing) fails CI: the runbooks stay true.

usage: python runbook_commands.py path/to/kraken-token-broker
"""

import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from ktb_harness import free_port, start_simulator, stop_all, wait, write_broker_config

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```bash ci\n(.*?)^```", re.M | re.S)


def main() -> None:
    binary = str(Path(sys.argv[1]).resolve())
    blocks = BLOCK.findall((ROOT / "proto-docs" / "runbooks.md").read_text())
    assert len(blocks) >= 6, f"expected the runbook's ci blocks, found {len(blocks)}"
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="ktb-runbook-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            sim, addr = start_simulator(binary, tmp)
            procs.append(sim)
            api, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            write_broker_config(tmp, addr, api, admin)
            broker = subprocess.Popen([binary, "serve", "--config", str(tmp / "broker.toml")],
                                      stdout=subprocess.DEVNULL, stderr=(tmp / "broker.log").open("w"))
            procs.append(broker)

            def ready() -> bool:
                with urllib.request.urlopen(f"http://{admin}/readyz", timeout=2) as r:
                    return r.status == 200

            wait("the broker to be ready", 30, ready)
            (tmp / "new-api-key").write_text("NEWKEYnewkey1234567890")
            (tmp / "new-api-secret").write_text("c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
            env = dict(os.environ, ADMIN=f"http://{admin}", KTB_CONFIG=str(tmp / "broker.toml"),
                       PATH=f"{Path(binary).parent}{os.pathsep}{os.environ['PATH']}")
            for i, block in enumerate(blocks, 1):
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp, env=env,
                                     capture_output=True, text=True, timeout=60)
                first = block.strip().splitlines()[0]
                if run.returncode != 0 or not run.stdout.strip():
                    print(run.stdout, run.stderr, sep="\n", file=sys.stderr)
                    raise AssertionError(f"runbook block {i} failed ({run.returncode}): {first}")
                print(f"runbook block {i} ok: {first}")
                for line in run.stdout.strip().splitlines()[:3]:
                    print(f"    {line}")
        finally:
            stop_all(procs)


if __name__ == "__main__":
    main()
