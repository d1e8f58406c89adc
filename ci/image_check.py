"""Builds the project's container image with its own Dockerfile and runs it
as the chart runs it.

No image registry is reachable in CI, so the Dockerfile's two bases are made
here from Debian's packages (debootstrap): a minbase system for the build
stage (which only copies the release binary built on the host, PREBUILT),
and a distroless-like runtime base holding only what gcr.io/distroless/cc
holds for this binary (glibc, libgcc_s, CA certificates, a user 65532).

The container is then run the way the chart runs it: the security context
(user, read-only root filesystem, capabilities, privilege escalation,
seccomp), the memory limit and the key files' mode are read from the chart's
rendered workload and turned into `docker run` flags; a key of the security
context this script cannot express fails the check, so the chart cannot
drift from what was tested. Beside it on a user-defined network runs the
simulator (the same image). Checked: /readyz 200 through the published admin
port, a token fetched through the published API port, no token in the
container's logs, and SIGTERM ending the container with exit code 0 within
its drain time.

The broker runs the config the chart renders (its key paths, its args),
with only the Kraken URLs and the example consumer's credential replaced.

Usage: image_check.py <release-binary>
"""

import base64
import json
import os
import re
import secrets
import hashlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import yaml

from ktb_harness import wait

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kraken-token-broker"
MIRROR = os.environ.get("KTB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
BUILD_BASE = "ktb-ci/build-base:bookworm"
RUNTIME_BASE = "ktb-ci/runtime-base:bookworm"
IMAGE = "kraken-token-broker:ci"
# The runtime base's packages: what distroless/cc carries that this binary uses
# (ldd: libc, libm, libgcc_s, the loader) and the CA bundle.
RUNTIME_PACKAGES = ["libc6", "libgcc-s1", "ca-certificates"]
PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"


def step(what: str) -> None:
    print(f"-- {what}", flush=True)


def run(*args: str, check: bool = True, capture: bool = False, **kw) -> subprocess.CompletedProcess:
    if capture:
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(list(args), check=check, text=True, **kw)


def docker(*args: str, check: bool = True) -> str:
    out = run("docker", *args, check=False, capture=True)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} failed ({out.returncode}):\n{out.stdout}")
    return out.stdout.strip()


def image_exists(tag: str) -> bool:
    return run("docker", "image", "inspect", tag, check=False, capture=True).returncode == 0


def make_bases(work: Path) -> None:
    if image_exists(BUILD_BASE) and image_exists(RUNTIME_BASE):
        step("bases already imported")
        return
    rootfs = work / "rootfs"
    step(f"debootstrap --variant=minbase {SUITE} from {MIRROR}")
    started = time.monotonic()
    run("debootstrap", "--variant=minbase", "--include=ca-certificates", SUITE, str(rootfs), MIRROR,
        stdout=subprocess.DEVNULL)
    print(f"   {time.monotonic() - started:.0f} s")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run("docker", "import", "-", BUILD_BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()

    # The runtime base: the listed packages' files, copied at their real paths
    # (bookworm's /lib and /lib64 are links into /usr), and the links.
    runtime = work / "runtime"
    runtime.mkdir()
    info = rootfs / "var/lib/dpkg/info"
    for package in RUNTIME_PACKAGES:
        lists = list(info.glob(f"{package}.list")) + list(info.glob(f"{package}:*.list"))
        assert lists, f"no file list for {package}"
        for listed in lists[0].read_text().splitlines():
            copy_real(rootfs, runtime, listed)
    # The CA bundle is made by ca-certificates' postinst, not listed.
    for made in ["etc/ssl/certs"]:
        shutil.copytree(rootfs / made, runtime / made, symlinks=True, dirs_exist_ok=True)
    for link, target in [("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin"), ("sbin", "usr/sbin")]:
        if not (runtime / link).is_symlink():
            if (runtime / link).exists():
                shutil.rmtree(runtime / link)
            (runtime / link).symlink_to(target)
    (runtime / "etc/passwd").write_text(PASSWD)
    (runtime / "etc/group").write_text(GROUP)
    (runtime / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (runtime / "home/nonroot").mkdir(parents=True, exist_ok=True)
    os.chown(runtime / "home/nonroot", 65532, 65532)
    tar = subprocess.Popen(["tar", "-C", str(runtime), "-c", "."], stdout=subprocess.PIPE)
    run("docker", "import", "-", RUNTIME_BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()
    assert not (runtime / "usr/bin/sh").exists(), "the runtime base has no shell"


def copy_real(rootfs: Path, out: Path, listed: str) -> None:
    """Copies one dpkg-listed path from rootfs to out, at its parent's real
    path (the entry itself is kept as it is: a link stays a link)."""
    if listed in ("", "/."):
        return
    source = rootfs / listed.lstrip("/")
    if not os.path.lexists(source):
        return
    parent = Path(os.path.realpath(source.parent)).relative_to(os.path.realpath(rootfs))
    target = out / parent / source.name
    if source.is_dir() and not source.is_symlink():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target, follow_symlinks=False)


def build_image(binary: Path, work: Path) -> int:
    context = work / "context"
    context.mkdir()
    shutil.copy2(binary, context / "kraken-token-broker")
    step("docker build with the project's Dockerfile")
    run("docker", "build", "--quiet", "-f", str(ROOT / "Dockerfile"),
        "--build-arg", f"BUILD_IMAGE={BUILD_BASE}",
        "--build-arg", f"RUNTIME_IMAGE={RUNTIME_BASE}",
        "--build-arg", "PREBUILT=kraken-token-broker",
        "-t", IMAGE, str(context), stdout=subprocess.DEVNULL)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    base = int(docker("image", "inspect", "-f", "{{.Size}}", RUNTIME_BASE))
    print(f"   image {IMAGE}: {size / 1e6:.1f} MB ({base / 1e6:.1f} MB runtime base, "
          f"{binary.stat().st_size / 1e6:.1f} MB binary)")
    user = docker("image", "inspect", "-f", "{{.Config.User}}", IMAGE)
    assert user == "65532:65532", f"the image runs as 65532, not {user!r}"
    return size


def chart_pod() -> tuple[dict, dict, dict, str]:
    """The chart's default workload (its first replica): pod spec, broker
    container, keys volume, and the broker.toml it renders."""
    chart = helm.Chart.load(str(CHART))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    out = chart.render(values, name="ktb", namespace="trading")
    docs = [d for path, text in out.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    config = next(d["data"]["broker.toml"] for d in docs
                  if d.get("kind") == "ConfigMap" and "broker.toml" in d.get("data", {}))
    for doc in docs:
        if doc.get("kind") in ("StatefulSet", "Deployment"):
            pod = doc["spec"]["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == "broker")
            keys = next((v for v in pod.get("volumes", []) if v["name"] == "keys"), {})
            return pod, container, keys, config
    raise AssertionError("the chart renders no broker workload")


def point_at_simulator(config: str, credential: str) -> str:
    """The chart's broker.toml with Kraken's URLs replaced by the simulator's
    and the example consumer's hash by the test credential's."""
    replaced = re.sub(r'(?m)^rest_url = ".*"$', 'rest_url = "http://kraken-sim:8090"', config)
    replaced = re.sub(r'(?m)^ws_url = ".*"$', 'ws_url = "ws://kraken-sim:8090/v2"', replaced)
    digest = hashlib.sha256(credential.encode()).hexdigest()
    replaced, n = re.subn(r'(?m)^credential_sha256 = ".*"$', f'credential_sha256 = "{digest}"', replaced, count=1)
    assert n == 1 and "kraken-sim" in replaced, "the chart's config has the Kraken URLs and a credential consumer"
    return replaced


def run_flags(pod: dict, container: dict, keys: dict) -> tuple[list[str], int, int, int]:
    """`docker run` flags for the chart's security context and limits; the
    fsGroup and mode the key files get; the termination grace period."""
    merged = dict(pod.get("securityContext", {}))
    fs_group = merged.pop("fsGroup", None)
    merged.pop("fsGroupChangePolicy", None)
    merged.update(container.get("securityContext", {}))
    flags: list[str] = []
    user, group = merged.pop("runAsUser", None), merged.pop("runAsGroup", None)
    assert user not in (None, 0), "the chart runs the broker as a non-root user"
    flags += ["--user", f"{user}:{group if group is not None else user}"]
    if merged.pop("runAsNonRoot", False):
        assert user != 0
    if merged.pop("readOnlyRootFilesystem", False):
        flags.append("--read-only")
    if merged.pop("allowPrivilegeEscalation", True) is False:
        flags += ["--security-opt", "no-new-privileges"]
    caps = merged.pop("capabilities", {})
    for cap in caps.get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        flags += ["--cap-add", cap]
    seccomp = merged.pop("seccompProfile", {"type": "RuntimeDefault"})
    assert seccomp.get("type") == "RuntimeDefault", f"seccomp {seccomp}: docker's default profile is RuntimeDefault"
    assert merged.pop("privileged", False) is False
    assert not merged, f"security context keys this check cannot run as the chart does: {sorted(merged)}"
    assert "--read-only" in flags and ["--cap-drop", "ALL"] == flags[flags.index("--cap-drop"):][:2], \
        "the chart drops every capability and mounts the root filesystem read-only"
    if fs_group is not None:
        flags += ["--group-add", str(fs_group)]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        flags += ["--memory", str(limits["memory"]).replace("Mi", "m").replace("Gi", "g")]
    mode = keys.get("secret", {}).get("defaultMode", 0o644)
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    return flags, fs_group if fs_group is not None else 0, mode, grace


def http(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def published(container: str, port: int) -> str:
    line = docker("port", container, f"{port}/tcp").splitlines()[0]
    return line.replace("0.0.0.0", "127.0.0.1")


def run_containers(work: Path) -> None:
    pod, container, keys, chart_config = chart_pod()
    flags, fs_group, mode, grace = run_flags(pod, container, keys)
    step(f"chart's pod as docker flags: {' '.join(flags)}; key files mode {mode:o}, group {fs_group}")
    tag = f"ktb-ci-{os.getpid()}"
    network, sim, broker = f"{tag}-net", f"{tag}-sim", f"{tag}-broker"
    api_key = base64.b64encode(secrets.token_bytes(42)).decode()
    api_secret = base64.b64encode(secrets.token_bytes(64)).decode()
    credential = "ktb_" + secrets.token_urlsafe(32)

    config = work / "config"
    keydir = work / "keys" / "main"
    config.mkdir()
    keydir.mkdir(parents=True)
    (keydir / "api-key").write_text(api_key + "\n")
    (keydir / "api-secret").write_text(api_secret + "\n")
    for f in [keydir / "api-key", keydir / "api-secret"]:
        os.chown(f, 0, fs_group)
        os.chmod(f, mode)
    for d in [work / "keys", keydir]:
        os.chown(d, 0, fs_group)
        os.chmod(d, 0o750)
    # The chart's own config, its key paths and all: the account files are
    # laid out as the chart's keys volume lays them out.
    (config / "broker.toml").write_text(point_at_simulator(chart_config, credential))
    items = {i["path"] for i in keys.get("secret", {}).get("items", [])}
    assert items == {"main/api-key", "main/api-secret"}, f"the chart's key files: {items}"
    os.chmod(config, 0o755)
    os.chmod(config / "broker.toml", 0o644)

    # What a killed earlier run left behind.
    for leftover in docker("ps", "-aq", "--filter", "name=ktb-ci-").split():
        docker("rm", "-f", leftover, check=False)
    for leftover in docker("network", "ls", "-q", "--filter", "name=ktb-ci-").split():
        docker("network", "rm", leftover, check=False)
    try:
        docker("network", "create", network)
        step("simulator and broker on a user-defined network")
        env = dict(os.environ, KTB_SIM_API_KEY=api_key, KTB_SIM_API_SECRET=api_secret)
        out = run("docker", "run", "-d", "--name", sim, "--network", network, "--network-alias", "kraken-sim",
                  *flags, "-e", "KTB_SIM_API_KEY", "-e", "KTB_SIM_API_SECRET",
                  IMAGE, "simulate", "--listen", "0.0.0.0:8090", env=env, check=False, capture=True)
        assert out.returncode == 0, out.stdout
        wait("the simulator", 30, lambda: "listening on" in docker("logs", sim), every=0.2)
        docker("run", "-d", "--name", broker, "--network", network, *flags,
               "--stop-timeout", str(grace),
               "-v", f"{config}:/etc/kraken-token-broker/config:ro",
               "-v", f"{work / 'keys'}:/etc/kraken-token-broker/keys:ro",
               "-p", "127.0.0.1::8080", "-p", "127.0.0.1::9090", IMAGE, *container.get("args", []))
        api, admin = published(broker, 8080), published(broker, 9090)
        ready = wait("/readyz 200", 60, lambda: http(f"http://{admin}/readyz")[0] == 200, every=0.2)
        assert ready
        status, body = http(f"http://{api}/v1/token?account=main", credential)
        assert status == 200, f"/v1/token answered {status}: {body}"
        token = json.loads(body)["token"]
        assert token, "a token"
        print(f"   /readyz 200 through {admin}; a token through {api} (expires_in {json.loads(body).get('expires_in')})")
        status, _ = http(f"http://{api}/v1/token?account=main", "ktb_not-a-credential")
        assert status == 401, f"a wrong credential is refused, not {status}"

        # A watch stream held open across SIGTERM: the drain ends it cleanly.
        stream = urllib.request.urlopen(urllib.request.Request(
            f"http://{api}/v1/token/watch?account=main", headers={"Authorization": f"Bearer {credential}"}),
            timeout=grace + 10)
        first = stream.readline().decode()
        assert first.startswith("event: token"), f"the watch stream starts with the token: {first!r}"
        ended: dict[str, object] = {}

        def read_to_end() -> None:
            try:
                ended["rest"] = stream.read().decode()
            except Exception as e:  # noqa: BLE001 (reported below)
                ended["error"] = repr(e)
            ended["at"] = time.monotonic()

        reader = threading.Thread(target=read_to_end, daemon=True)
        reader.start()

        step("SIGTERM with a watch stream open")
        started = time.monotonic()
        docker("kill", "--signal", "TERM", broker)
        code = int(docker("wait", broker))
        took = time.monotonic() - started
        reader.join(timeout=5)
        assert "at" in ended and "error" not in ended, f"the watch stream ends cleanly at the drain: {ended}"
        print(f"   the watch stream ended cleanly {float(ended['at']) - started:.1f} s after SIGTERM")
        logs = docker("logs", broker)
        assert token not in logs and api_secret not in logs and credential not in logs, "no secret in the logs"
        assert code == 0, f"exit code {code} after SIGTERM:\n{logs[-3000:]}"
        assert took < grace, f"stopped in {took:.1f} s, the grace period is {grace} s"
        print(f"   exit code 0 in {took:.1f} s (grace {grace} s); no token, secret or credential in its logs")
    finally:
        for c in (broker, sim):
            run("docker", "rm", "-f", c, check=False, capture=True)
        run("docker", "network", "rm", network, check=False, capture=True)


def main() -> None:
    binary = Path(sys.argv[1]).resolve()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ktb-image-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        make_bases(work)
        build_image(binary, work)
        run_containers(work)
    print(f"image check passed in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
