"""Renders the chart's defaults into plain manifests for teams that do not
run Helm, and checks that the committed ones have not drifted.

- deploy/kubernetes/kraken-token-broker.yaml: one file for `kubectl apply -f`
  (release `ktb`, namespace `trading`; two replicas, each a StatefulSet of one
  pod reading its own keys Secret; no Grafana dashboard ConfigMap);
- deploy/kustomize/base/: the same objects, with a kustomization.yaml.
  deploy/kustomize/overlays/example/ (written by hand, not here) adds an
  engine with the agent as a sidecar.

usage: python ci/render_manifests.py [--check]
  --check: fail (exit 1) if the committed files differ from a fresh render.
"""

import sys
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kraken-token-broker"
PLAIN = ROOT / "deploy" / "kubernetes" / "kraken-token-broker.yaml"
BASE = ROOT / "deploy" / "kustomize" / "base"
HEADER = (
    "# Rendered from helm/kraken-token-broker with its default values (release\n"
    "# `ktb`, namespace `trading`) by ci/render_manifests.py; CI fails if it drifts from\n"
    "# the chart. Do not edit: change the chart, then run\n"
    "#   python ci/render_manifests.py\n"
    "# Before applying: create each replica's keys Secret (see the chart's\n"
    "# NOTES, or proto-docs/deploying.md) and replace the example consumer's hash.\n"
    "# The Grafana dashboard is left out: import\n"
    "# helm/kraken-token-broker/files/dashboard.json into Grafana yourself.\n"
)

# What the plain manifests change from the chart's defaults: the dashboard
# is a Grafana sidecar's concern, and its JSON is better imported as a file.
OVERRIDES = {"dashboard": {"enabled": False}}


def rendered() -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in OVERRIDES.items():
        values[key].update(value)
    out = chart.render(values, name="ktb", namespace="trading")
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                # Helm's own labels say Helm manages these; here kubectl does.
                template = doc.get("spec", {}).get("template", {}).get("metadata", {})
                for labels in (doc["metadata"].get("labels", {}), template.get("labels", {})):
                    labels.pop("helm.sh/chart", None)
                    if labels.get("app.kubernetes.io/managed-by") == "Helm":
                        labels["app.kubernetes.io/managed-by"] = "kubectl"
                if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                    doc["metadata"].setdefault("namespace", "trading")
                docs.append(doc)
    files: dict[str, str] = {}
    files[str(PLAIN.relative_to(ROOT))] = HEADER + yaml.safe_dump_all(docs, sort_keys=False)
    names = []
    for doc in docs:
        name = f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        names.append(name)
        files[str((BASE / name).relative_to(ROOT))] = HEADER + yaml.safe_dump(doc, sort_keys=False)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "trading",
        "resources": names,
    }
    files[str((BASE / "kustomization.yaml").relative_to(ROOT))] = HEADER + yaml.safe_dump(kustomization, sort_keys=False)
    return files


def main() -> None:
    check = "--check" in sys.argv[1:]
    files = rendered()
    drift = []
    for rel, text in files.items():
        path = ROOT / rel
        if check:
            if not path.exists() or path.read_text() != text:
                drift.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check:
        stale = [p for p in BASE.glob("*.yaml") if str(p.relative_to(ROOT)) not in files]
        drift += [str(p.relative_to(ROOT)) for p in stale]
        if drift:
            print("manifests drifted from the chart (run: python ci/render_manifests.py):", *drift, sep="\n  ")
            sys.exit(1)
        print(f"manifests match the chart ({len(files)} files)")
    else:
        print(f"wrote {len(files)} files")


if __name__ == "__main__":
    main()
