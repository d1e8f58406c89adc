"""Checks of the plain manifests (deploy/): they match the chart (no drift),
`kubectl kustomize` renders the base and the example overlay, every object
passes kubernetes-validate --strict for Kubernetes 1.29 and 1.33, and the
overlay's broker.toml passes the broker's own check-config.

usage: python ci/manifest_checks.py BROKER_BINARY
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chart_checks import KUBE_VERSIONS, validate_kinds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def validate(docs: list[dict], label: str) -> None:
    validate_kinds(docs, label)
    print(f"{label}: {len(docs)} objects valid for Kubernetes {', '.join(KUBE_VERSIONS)}")


def kustomize(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


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
    (config,) = [d for d in overlay if d["kind"] == "ConfigMap"]
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "0" / "main"
        keys.mkdir(parents=True)
        (keys / "api-key").write_text("KEY\n")
        (keys / "api-secret").write_text("AAECAw==\n")
        text = config["data"]["broker.toml"].replace("/etc/kraken-token-broker/keys", tmp)
        (Path(tmp) / "broker.toml").write_text(text)
        result = subprocess.run([binary, "check-config", "--config", f"{tmp}/broker.toml"], capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "KTB_REPLICA": "0"})
        assert result.returncode == 0, f"the overlay's broker.toml is accepted:\n{result.stderr}"
        assert "mm-engine" in result.stdout, result.stdout
    print("manifest checks passed")


if __name__ == "__main__":
    main()
