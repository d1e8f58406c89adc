"""TLS and pinned-core benchmarks of GET /v1/token, against nginx in the same run.

- TLS keep-alive: wrk at 32 connections over TLS (ECDSA P-256 certificate,
  made here with the openssl CLI), broker and nginx with the same certificate
  and a body of the same size;
- TLS handshakes: the same with `Connection: close`, so every request makes a
  new connection and a full handshake (wrk never offers a session to resume;
  nginx's session cache and tickets are off all the same);
- plain HTTP with the server and the load generator on separate cores
  (`taskset`): the server on core 0 (the broker's runtime then has one worker
  thread; nginx one worker process), wrk on the others. This is how the
  broker runs in production, with engines on other machines.

usage: python bench/tls.py BROKER_BINARY OUT.json
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import UNLIMITED, get, nginx_conf, wrk  # noqa: E402
from ktb_harness import free_port, start_simulator, stop_all, wait, write_broker_config  # noqa: E402

DURATION = os.environ.get("BENCH_DURATION", "10s")
CPUS = os.cpu_count() or 1


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificates(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 it signs (ECDSA P-256)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=bench-ca", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    openssl("req", *ec, "-subj", "/CN=bench", "-keyout", str(d / "tls.key"), "-out", str(d / "tls.csr"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
            "-days", "2", "-out", str(d / "tls.crt"), "-extfile", str(ext))


def fake_api_server(tmp: Path, audience: str, username: str) -> tuple[int, list[int]]:
    """A TokenReview endpoint over TLS (the bench certificate) that
    authenticates every token as `username`; returns its port and a counter
    of the reviews it answered."""
    import http.server
    import ssl
    import threading

    reviews = [0]

    class Review(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            spec = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["spec"]
            reviews[0] += 1
            body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec,
                               "status": {"authenticated": True, "audiences": [audience],
                                          "user": {"username": username}}}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Review)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], reviews


def jwt(audience: str, subject: str) -> str:
    import base64
    import time

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    claims = {"aud": [audience], "sub": subject, "exp": int(time.time()) + 3600}
    header = b64(json.dumps({"alg": "RS256"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(b'signature')}"


def pinned(cores: str, args: list[str]) -> list[str]:
    return ["taskset", "-c", cores, *args]


def main() -> None:
    binary, out_path = sys.argv[1], Path(sys.argv[2])
    tmp = Path(tempfile.mkdtemp(prefix="ktb-bench-tls-"))
    tmp.chmod(0o755)  # nginx's workers run as an unprivileged user
    procs: list[subprocess.Popen] = []
    results: dict = {"machine": {"cpus": CPUS, "kernel": os.uname().release}}
    env = dict(os.environ, RUST_LOG="warn")
    try:
        sim_proc, addr = start_simulator(binary, tmp, "--tier", "pro")
        procs.append(sim_proc)
        certificates(tmp)
        (tmp / "tls.key").chmod(0o644)  # for nginx's workers; a bench key

        # The broker over TLS.
        tls_port, tls_admin = free_port(), free_port()
        tls_dir = tmp / "tls-broker"
        tls_dir.mkdir()
        for f in ["api-key", "api-secret"]:
            (tls_dir / f).write_text((tmp / f).read_text())
        listen_tls = f'[listen.tls]\ncert = {{ file = "{tmp}/tls.crt" }}\nkey = {{ file = "{tmp}/tls.key" }}\n'
        credential = write_broker_config(tls_dir, addr, f"127.0.0.1:{tls_port}", f"127.0.0.1:{tls_admin}",
                                         consumer_extra=UNLIMITED)
        text = (tls_dir / "broker.toml").read_text().replace("[kraken]", listen_tls + "[kraken]", 1)
        (tls_dir / "broker.toml").write_text(text)
        broker = subprocess.Popen([binary, "serve", "--config", str(tls_dir / "broker.toml")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(broker)
        wait("the TLS broker", 10, lambda: get(f"http://127.0.0.1:{tls_admin}/readyz")[0] == 200)
        auth = f"Authorization: Bearer {credential}"
        tls_url = f"https://127.0.0.1:{tls_port}/v1/token"
        body = subprocess.run(["curl", "-fs", "--cacert", str(tmp / "ca.crt"), "-H", auth, tls_url],
                              capture_output=True, check=True).stdout
        root = tmp / "www"
        root.mkdir()
        (root / "token.json").write_bytes(body)
        nginx_tls_port = free_port()
        procs.append(subprocess.Popen(["nginx", "-c", str(nginx_conf(tmp, root, nginx_tls_port, True, "auto")),
                                       "-p", str(tmp), "-g", "daemon off;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nginx_tls_url = f"https://127.0.0.1:{nginx_tls_port}/v1/token"
        wait("nginx over TLS", 10, lambda: subprocess.run(["curl", "-fsk", nginx_tls_url], capture_output=True).returncode == 0)

        wrk(tls_url, 32, "2s", header=auth)  # warm-up
        wrk(nginx_tls_url, 32, "2s")
        broker_ka = wrk(tls_url, 32, DURATION, header=auth)
        nginx_ka = wrk(nginx_tls_url, 32, DURATION)
        results["tls_keepalive_32"] = {"broker": broker_ka, "nginx": nginx_ka, "ratio": broker_ka["rps"] / nginx_ka["rps"]}
        print("TLS keep-alive:", json.dumps(results["tls_keepalive_32"]), flush=True)

        # One handshake per request.
        broker_hs = wrk(tls_url, 16, DURATION, header=auth + "\r\nConnection: close")
        nginx_hs = wrk(nginx_tls_url, 16, DURATION, header="Connection: close")
        results["tls_handshakes_16"] = {"broker": broker_hs, "nginx": nginx_hs, "ratio": broker_hs["rps"] / nginx_hs["rps"]}
        print("TLS handshakes:", json.dumps(results["tls_handshakes_16"]), flush=True)
        stop_all(procs[1:])
        procs = procs[:1]

        # Plain HTTP, server on core 0, wrk on the rest.
        if CPUS >= 2:
            load_cores = f"1-{CPUS - 1}"
            port, admin = free_port(), free_port()
            plain_dir = tmp / "plain-broker"
            plain_dir.mkdir()
            for f in ["api-key", "api-secret"]:
                (plain_dir / f).write_text((tmp / f).read_text())
            # A second consumer with a ServiceAccount token, reviewed by a
            # fake API server once and then served from the review cache.
            username = "system:serviceaccount:bench:engine"
            api_port, reviews = fake_api_server(tmp, "kraken-token-broker", username)
            (plain_dir / "sa-token").write_text("the-brokers-own-token\n")
            kubernetes = (f'[kubernetes]\naudience = "kraken-token-broker"\napi_url = "https://127.0.0.1:{api_port}"\n'
                          f'ca = {{ file = "{tmp}/ca.crt" }}\ntoken = {{ file = "{plain_dir}/sa-token" }}\ncache_ttl = "600s"\n')
            sa_consumer = (f'\n[[consumer]]\nname = "sa-engine"\nkubernetes = {{ namespace = "bench", service_account = "engine" }}\n'
                           f'accounts = ["main"]\n{UNLIMITED}\n')
            credential = write_broker_config(plain_dir, addr, f"127.0.0.1:{port}", f"127.0.0.1:{admin}",
                                             extra="", consumer_extra=UNLIMITED + sa_consumer)
            text = (plain_dir / "broker.toml").read_text().replace("[[account]]", kubernetes + "[[account]]", 1)
            (plain_dir / "broker.toml").write_text(text)
            auth = f"Authorization: Bearer {credential}"
            sa_auth = f"Authorization: Bearer {jwt('kraken-token-broker', username)}"
            broker = subprocess.Popen(pinned("0", [binary, "serve", "--config", str(plain_dir / "broker.toml")]),
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(broker)
            wait("the pinned broker", 10, lambda: get(f"http://127.0.0.1:{admin}/readyz")[0] == 200)
            nginx_port = free_port()
            procs.append(subprocess.Popen(pinned("0", ["nginx", "-c", str(nginx_conf(tmp, root, nginx_port, False, "1")),
                                                       "-p", str(tmp), "-g", "daemon off;"]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            url, nginx_url = f"http://127.0.0.1:{port}/v1/token", f"http://127.0.0.1:{nginx_port}/v1/token"
            wait("pinned nginx", 10, lambda: get(nginx_url)[0] == 200)

            def load(u: str, c: int, header: str | None = None) -> dict:
                return wrk(u, c, DURATION, threads=max(1, CPUS - 1), header=header,
                           prefix=("taskset", "-c", load_cores))

            pinned_results = {}
            for c in [8, 32]:
                load(url, c, auth)  # warm-up
                b = load(url, c, auth)
                n = load(nginx_url, c)
                pinned_results[str(c)] = {"broker": b, "nginx": n, "ratio": b["rps"] / n["rps"]}
                print(f"pinned plain HTTP at {c}:", json.dumps(pinned_results[str(c)]), flush=True)
            results["pinned_plain"] = {"server_cores": "0", "load_cores": load_cores, "runs": pinned_results}

            # A ServiceAccount-token request served from the review cache,
            # against a credential request, in the same pinned setup.
            assert get(url, {"Authorization": sa_auth.split(": ", 1)[1]})[0] == 200
            load(url, 32, sa_auth)  # warm-up
            cred = load(url, 32, auth)
            sa = load(url, 32, sa_auth)
            results["service_account_vs_credential_32"] = {
                "credential": cred, "service_account": sa, "ratio": sa["rps"] / cred["rps"], "reviews": reviews[0]}
            print("ServiceAccount token vs credential:", json.dumps(results["service_account_vs_credential_32"]), flush=True)
    finally:
        stop_all(procs)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
