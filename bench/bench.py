"""Load benchmark of the broker's GET /v1/token, against nginx in the same run.

Starts the Kraken simulator and a broker (release build) on loopback, and
nginx serving a static body of the same size as the broker's answer, then
measures with wrk:

- throughput and latency (p50/p99) at 32 connections, broker and nginx, and
  the broker's RSS at full load;
- the same across 1..128 connections, for the plot;
- a flood of wrong credentials beside valid requests (the per-address throttle
  must not slow good consumers);
- cold start: from the simulator's answer to the first 200 from /readyz.

usage: python bench/bench.py BROKER_BINARY OUT.json
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
from ktb_harness import free_port, start_simulator, stop_all, wait, write_broker_config  # noqa: E402

DURATION = os.environ.get("BENCH_DURATION", "10s")
UNLIMITED = "rate_limit = { per_second = 1000000, burst = 1000000 }"
SWEEP_DURATION = os.environ.get("BENCH_SWEEP_DURATION", "5s")


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def to_ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, connections: int, duration: str, threads: int = 2, header: str | None = None,
        prefix: tuple[str, ...] = ()) -> dict:
    """wrk's figures; `prefix` runs it under e.g. `taskset -c 1`."""
    args = [*prefix, "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration}", "--latency"]
    if header:
        args += ["-H", header]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: to_ms(re.search(rf"^\s+{p}%\s+(\S+)", out, re.M).group(1)) for p in ("50", "99")}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "connections": connections,
        "rps": rps,
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def nginx_conf(tmp: Path, root: Path, port: int, tls: bool, workers: str) -> Path:
    """nginx serving root/token.json at /v1/token on 127.0.0.1:port (TLS with
    tmp/tls.crt and tmp/tls.key when `tls`, resuming no sessions)."""
    for d in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]:
        (tmp / d).mkdir(exist_ok=True)
    listen = f"127.0.0.1:{port}" + (" ssl" if tls else "")
    ssl = f"""
    ssl_certificate {tmp}/tls.crt;
    ssl_certificate_key {tmp}/tls.key;
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;""" if tls else ""
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(f"""
worker_processes {workers};
pid {tmp}/nginx-{port}.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/client_body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  server {{
    listen {listen};{ssl}
    location = /v1/token {{
      default_type application/json;
      add_header Cache-Control no-store;
      alias {root}/token.json;
    }}
  }}
}}
""")
    return conf



def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop = True
        self.thread.join()


def main() -> None:
    binary, out_path = sys.argv[1], Path(sys.argv[2])
    tmp = Path(tempfile.mkdtemp(prefix="ktb-bench-"))
    # nginx's workers run as an unprivileged user; nothing here is a real secret.
    tmp.chmod(0o755)
    procs: list[subprocess.Popen] = []
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    try:
        # The simulator, with Kraken's 900 s tokens, and a broker config.
        sim_proc, addr = start_simulator(binary, tmp, "--tier", "pro")
        procs.append(sim_proc)
        sim = f"http://{addr}"
        api_port, admin_port = free_port(), free_port()
        # wrk plays many engines with one consumer: a rate limit that never binds.
        credential = write_broker_config(tmp, addr, f"[::]:{api_port}", f"127.0.0.1:{admin_port}",
                                         consumer_extra=UNLIMITED)
        config = tmp / "broker.toml"
        env = dict(os.environ, RUST_LOG="warn")

        # Cold start: from the simulator's answer to the first ready /readyz.
        cold = []
        for _ in range(20):
            # Twenty starts in a row would hit Kraken's call counter (as they should).
            urllib.request.urlopen(urllib.request.Request(f"{sim}/_sim/reset-limits", method="POST", headers={"Content-Type": "application/json"}), timeout=5)
            broker = subprocess.Popen([binary, "serve", "--config", str(config)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = time.time()
            wait("readiness", 10, lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200, every=0.001)
            ready_ms = time.time() * 1000
            calls = json.loads(get(f"{sim}/_sim/calls")[1])["calls"]
            answered_ms = calls[-1]["at_unix_ms"]
            cold.append({"process_to_ready_ms": ready_ms - started * 1000,
                         "answer_to_ready_ms": max(0.0, ready_ms - answered_ms)})
            broker.terminate()
            broker.wait(timeout=10)
        results["cold_start"] = {
            "runs": len(cold),
            "answer_to_ready_ms_p50": statistics.median(c["answer_to_ready_ms"] for c in cold),
            "answer_to_ready_ms_max": max(c["answer_to_ready_ms"] for c in cold),
            "process_to_ready_ms_p50": statistics.median(c["process_to_ready_ms"] for c in cold),
        }
        print("cold start:", results["cold_start"], flush=True)

        urllib.request.urlopen(urllib.request.Request(f"{sim}/_sim/reset-limits", method="POST", headers={"Content-Type": "application/json"}), timeout=5)
        broker = subprocess.Popen([binary, "serve", "--config", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(broker)
        auth = f"Authorization: Bearer {credential}"
        url = f"http://127.0.0.1:{api_port}/v1/token"
        wait("the broker", 10, lambda: get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200)
        status, body = get(url, {"Authorization": f"Bearer {credential}"})
        assert status == 200, body
        results["body_bytes"] = len(body)

        # nginx, serving a body of the same size, with the same headers' weight.
        nginx_port = free_port()
        root = tmp / "www"
        root.mkdir()
        (root / "token.json").write_bytes(body)
        procs.append(subprocess.Popen(["nginx", "-c", str(nginx_conf(tmp, root, nginx_port, False, "auto")), "-p", str(tmp), "-g", "daemon off;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nginx_url = f"http://127.0.0.1:{nginx_port}/v1/token"
        wait("nginx", 10, lambda: get(nginx_url)[0] == 200)
        results["nginx_body_bytes"] = len(get(nginx_url)[1])

        wrk(url, 32, "2s", header=auth)  # warm-up
        wrk(nginx_url, 32, "2s")
        with RssSampler(broker.pid) as rss:
            broker_32 = wrk(url, 32, DURATION, header=auth)
        broker_32["peak_rss_kib"] = rss.peak
        nginx_32 = wrk(nginx_url, 32, DURATION)
        results["at_32"] = {"broker": broker_32, "nginx": nginx_32, "ratio": broker_32["rps"] / nginx_32["rps"]}
        print("at 32 connections:", json.dumps(results["at_32"]), flush=True)

        sweep = {"broker": [], "nginx": []}
        for c in [1, 8, 32, 64, 128]:
            sweep["broker"].append(wrk(url, c, SWEEP_DURATION, header=auth))
            sweep["nginx"].append(wrk(nginx_url, c, SWEEP_DURATION))
            print("sweep", c, sweep["broker"][-1]["rps"], sweep["nginx"][-1]["rps"], flush=True)
        results["sweep"] = sweep

        # A flood of wrong credentials beside 8 good connections. The throttle
        # is per client address, so the flood comes from ::1 and the good
        # consumers from 127.0.0.1 (the broker listens on both).
        alone = wrk(url, 8, DURATION, threads=1, header=auth)
        flood_url = f"http://[::1]:{api_port}/v1/token"
        flood = subprocess.Popen(["wrk", "-t1", "-c32", f"-d{DURATION}", "-H", "Authorization: Bearer ktb_guess", flood_url],
                                 stdout=subprocess.PIPE, text=True)
        beside = wrk(url, 8, DURATION, threads=1, header=auth)
        flood_out = flood.communicate()[0]
        flood_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", flood_out).group(1))
        _, metrics = get(f"http://127.0.0.1:{admin_port}/metrics")
        throttled = sum(float(l.split()[-1]) for l in metrics.decode().splitlines()
                        if l.startswith('kraken_token_broker_http_requests_total{route="/v1/token",status="429"}'))
        results["brute_force"] = {"good_alone": alone, "good_beside_flood": beside, "flood_rps": flood_rps,
                                  "flood_answered_429": throttled}
        print("brute force:", json.dumps(results["brute_force"]), flush=True)
        _, metrics = get(f"http://127.0.0.1:{admin_port}/metrics")
        results["upstream_calls"] = sum(
            float(line.split()[-1]) for line in metrics.decode().splitlines()
            if line.startswith("kraken_token_broker_refreshes_total{"))
    finally:
        stop_all(procs)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
