"""Checks of the plain manifests (deploy/): they match the chart (no drift),
`kubectl kustomize` renders the base and the example overlay, every object
passes kubernetes-validate --strict for Kubernetes 1.29 and 1.33, and in the
overlay: each replica is one pod reading only its own keys Secret (an overlay
that scales a replica's StatefulSet is refused), the broker's image is the
one `images:` names, the pods' checksum/listen is that of the overlay's own
[listen], and its broker.toml passes the broker's own check-config.

usage: python ci/manifest_checks.py BROKER_BINARY
"""

import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chart_checks import KUBE_VERSIONS, REPLICA_LABEL, pod_specs, secrets_read_by, validate_kinds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def validate(docs: list[dict], label: str) -> None:
    validate_kinds(docs, label)
    print(f"{label}: {len(docs)} objects valid for Kubernetes {', '.join(KUBE_VERSIONS)}")


def kustomize(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def check_replicas(docs: list[dict]) -> None:
    """Each broker replica is one pod reading its own keys Secret and no
    other: a StatefulSet scaled past one would run two pods on one key."""
    prefix = "ktb-kraken-token-broker-keys"
    seen = []
    for metadata, pod in pod_specs(docs):
        keys = {s for s in secrets_read_by(pod) if s.startswith(prefix)}
        replica = metadata.get("labels", {}).get(REPLICA_LABEL)
        if replica is None:
            assert not keys, f"a pod that is no broker replica reads no keys: {keys}"
            continue
        seen.append(replica)
        assert keys == {f"{prefix}-{replica}"}, f"replica {replica} reads only its own keys Secret: {keys}"
    for sts in [d for d in docs if d["kind"] == "StatefulSet"]:
        assert sts["spec"].get("replicas", 1) == 1, (
            f"{sts['metadata']['name']} has {sts['spec']['replicas']} pods: they would share one key. Add a replica"
            " with its own StatefulSet and keys Secret (render the chart with replicaCount) instead"
        )
    assert len(seen) == len(set(seen)) >= 1, f"each replica once: {seen}"
    print(f"overlay: {len(seen)} replicas, each one pod reading only its own keys Secret")


def main() -> None:
    binary = sys.argv[1]
    subprocess.run([sys.executable, str(ROOT / "ci" / "render_manifests.py"), "--check"], check=True)
    plain = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/kraken-token-broker.yaml").read_text()) if d]
    validate(plain, "deploy/kubernetes/kraken-token-broker.yaml")
    base = kustomize("deploy/kustomize/base")
    assert sorted(d["kind"] for d in base) == sorted(d["kind"] for d in plain), "the base holds the plain manifest's objects"
    validate(base, "kustomize base")
    overlay = kustomize("deploy/kustomize/overlays/example")
    validate(overlay, "kustomize overlay example")
    (engine,) = [d for d in overlay if d["kind"] == "Deployment"]
    pod = engine["spec"]["template"]["spec"]
    agents = [c for c in pod["initContainers"] if c["args"][0] == "agent"]
    assert [a.get("restartPolicy") for a in agents] == [None, "Always"], "an --once init container, then a native sidecar"
    assert "--once" in agents[0]["args"] and "--once" not in agents[1]["args"]
    assert engine["spec"]["template"]["metadata"]["labels"]["kraken-token-broker/consumer"] == "true", "reaches the broker"
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in pod["containers"] + pod["initContainers"])
    check_replicas(overlay)
    kustomization = yaml.safe_load((ROOT / "deploy/kustomize/overlays/example/kustomization.yaml").read_text())
    images = [i for i in kustomization.get("images", []) if i["name"] == "kraken-token-broker"]
    assert len(images) == 1, "the overlay names where the broker's image is (images:), or it is pulled from Docker Hub"
    (image,) = images
    broker_images = {c["image"] for _, pod in pod_specs(overlay) for c in pod.get("containers", []) + pod.get("initContainers", [])
                     if "kraken-token-broker" in c["image"]}
    assert broker_images == {f"{image['newName']}:{image['newTag']}"}, f"every broker image is the one images: names: {broker_images}"
    (config,) = [d for d in overlay if d["kind"] == "ConfigMap"]
    text = config["data"]["broker.toml"]
    # What the chart's ktb.listenConfig renders: [listen] (and [listen.tls]) up to the next table.
    listen = re.search(r"^\[listen\]\n.*?(?=\n\n\[(?!listen))", text, re.S | re.M)
    assert listen, "the overlay's broker.toml has a [listen] table"
    digest = hashlib.sha256(listen.group(0).encode()).hexdigest()
    for sts in [d for d in overlay if d["kind"] == "StatefulSet"]:
        annotation = sts["spec"]["template"]["metadata"]["annotations"]["checksum/listen"]
        assert annotation == digest, (
            f"{sts['metadata']['name']}: checksum/listen {annotation} is not that of the overlay's [listen] ({digest}):"
            " patch the annotation, or pods keep serving the old listeners"
        )
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "main"
        keys.mkdir(parents=True)
        (keys / "api-key").write_text("KEY\n")
        (keys / "api-secret").write_text("AAECAw==\n")
        (Path(tmp) / "as-rendered.toml").write_text(text)
        result = subprocess.run([binary, "check-config", "--no-secrets", "--config", f"{tmp}/as-rendered.toml"],
                                capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, f"the overlay's broker.toml is accepted (--no-secrets):\n{result.stderr}"
        (Path(tmp) / "broker.toml").write_text(text.replace("/etc/kraken-token-broker/keys", tmp))
        result = subprocess.run([binary, "check-config", "--config", f"{tmp}/broker.toml"], capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, f"the overlay's broker.toml is accepted:\n{result.stderr}"
        assert "mm-engine" in result.stdout, result.stdout
    print("manifest checks passed")


if __name__ == "__main__":
    main()
