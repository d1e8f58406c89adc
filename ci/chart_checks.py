"""Conformance checks of the Helm chart, with no helm binary and no cluster.

- helm-python-sdk (Helm's own Go SDK) lints the chart: no warning, no error;
- it renders with the default values and with every optional part enabled;
- values.schema.json refuses bad values, each kind with a message naming it;
- every rendered built-in kind passes kubernetes-validate --strict for
  Kubernetes 1.29 and 1.33;
- the rendered PrometheusRule's groups pass `promtool check rules`;
- each replica's StatefulSet (one pod) has the pod security settings, probes,
  mounts and grace period the chart promises;
- rendered with 3 replicas, no pod spec can read another replica's keys
  Secret (volumes, projected sources, env, envFrom);
- every key of the broker's config has a values key and is rendered
  (ci/chart_config_keys.py), the relay's (`relay`, `relay_only`) included;
- only the config the broker cannot reload ([listen]) restarts the pods;
- the rendered broker.toml passes the broker's own `check-config`.

usage: python chart_checks.py BROKER_BINARY
"""

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate as kv
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chart_config_keys import check_config_keys  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kraken-token-broker"
KUBE_VERSIONS = ["1.29.0", "1.33.0"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}
REPLICA_LABEL = "kraken-token-broker/replica"
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}

checks = 0


def check(condition: bool, what: str) -> None:
    global checks
    checks += 1
    if not condition:
        raise AssertionError(what)


def defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def everything_enabled() -> dict:
    v = defaults()
    v["replicaCount"] = 3
    v["image"]["digest"] = "sha256:" + "0123456789abcdef" * 4
    v["kraken"].update(maxRejectedCalls=5, keyInfoInterval="15m")
    v["refresh"]["retryRejected"] = "2m"
    v["accounts"] = [
        {"name": "main", "otp": "none", "keyExpiresAt": "2027-03-01T00:00:00Z"},
        {"name": "alt", "otp": "static", "forbidPermissions": ["withdraw-funds", "export-data"]},
        {"name": "twofa", "otp": "totp", "forbidPermissions": []},
    ]
    v["consumers"] = [
        {"name": "mm-btc", "credentialSha256": "ab" * 32, "accounts": ["main"]},
        {"name": "mm-eth", "credentialSha256": "cd" * 32, "accounts": ["main", "alt", "twofa"], "rateLimit": {"perSecond": 20, "burst": 40}},
        {"name": "mm-sol", "serviceAccount": {"namespace": "trading", "name": "mm-sol"}, "accounts": ["main"],
         "relay": {"allow": ["subscribe:executions", "subscribe:balances", "unsubscribe", "add_order", "cancel_order"],
                   "maxConnections": 8},
         "relayOnly": True},
        {"name": "risk", "serviceAccount": {"namespace": "risk", "name": "monitor"}, "accounts": ["main"],
         "relay": {"allow": ["subscribe:executions", "unsubscribe:executions"]}, "relayOnly": False},
        {"name": "mm-relay", "credentialSha256": "ef" * 32, "accounts": ["alt"], "relay": {"maxConnections": 1}},
        {"name": "mm-xrp", "clientCert": {"uri": "spiffe://cluster.local/ns/trading/sa/mm-xrp"}, "accounts": ["alt"]},
        {"name": "mm-ada", "clientCert": {"dns": "mm-ada.trading.svc"}, "accounts": ["alt"]},
        {"name": "mm-old", "clientCertSan": "mm-old.trading.svc", "accounts": ["alt"]},
    ]
    v["tls"] = {
        "enabled": True,
        "secretName": "",
        "certManager": {
            "enabled": True,
            "issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
            "duration": "2160h",
            "renewBefore": "720h",
            "dnsNames": ["ktb.trading.example.com"],
        },
        "clientCaSecret": "engines-ca",
    }
    v["kubernetes"] = {
        "enabled": True, "audience": "kraken-token-broker", "cacheTtl": "30s", "apiServerCidrs": ["10.0.0.1/32"],
        "apiServerPort": 6443, "apiUrl": "https://10.0.0.1:6443",
    }
    v["audit"] = {"enabled": True, "fingerprintKeySecret": "ktb-audit"}
    data = {}
    for replica in range(3):
        for account, extra in [("main", None), ("alt", ("otp", "static-pass")), ("twofa", ("totp-secret", "JBSWY3DPEHPK3PXP"))]:
            data[f"{account}.{replica}.api-key"] = f"KEY-{account}-{replica}"
            data[f"{account}.{replica}.api-secret"] = "AAECAwQFBgc="
            if extra:
                data[f"{account}.{replica}.{extra[0]}"] = extra[1]
    v["keysSecret"] = {"create": True, "namePrefix": "", "data": data}
    v["serviceMonitor"] = {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s", "scrapeTimeout": "5s"}
    v["prometheusRule"] = {
        "enabled": True,
        "labels": {"release": "prometheus"},
        "runbookBaseUrl": "https://wiki.example.com/ktb/runbooks.md",
    }
    v["networkPolicy"]["consumerNamespaces"] = ["trading", "research"]
    v["serviceAccount"]["annotations"] = {"example.com/owner": "trading-infra"}
    v["podAnnotations"] = {"example.com/team": "mm"}
    v["nodeSelector"] = {"kubernetes.io/os": "linux"}
    v["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "trading", "effect": "NoSchedule"}]
    v["extraEnv"] = [{"name": "HTTPS_PROXY", "value": "http://egress-proxy.infra.svc:3128"}, {"name": "NO_PROXY", "value": ".svc"}]
    v["networkPolicy"]["egressPorts"] = [443, 3128]
    v["networkPolicy"]["dns"] = {"namespaceLabels": {"kubernetes.io/metadata.name": "dns"}, "podLabels": {"k8s-app": "coredns"}}
    v["dashboard"] = {"enabled": True, "labels": {"grafana_dashboard": "1", "team": "trading"}, "annotations": {"grafana_folder": "Trading"}}
    return v


def render(chart, values: dict) -> list[dict]:
    out = chart.render(values, name="ktb", namespace="trading")
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            check("kraken-token-broker" in text, "NOTES.txt renders")
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def lint(values: dict | None, label: str) -> None:
    report = helm.lint(str(CHART), values)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    check(not bad and not report["errors"], f"helm lint ({label}) is clean: {bad} {report['errors']}")


def validate_kinds(docs: list[dict], label: str) -> None:
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                raise AssertionError(f"{label}: {doc['kind']} invalid for Kubernetes {version}: {e}") from e
            check(True, "validated")


def check_prometheus_rule(docs: list[dict]) -> None:
    (rule,) = by_kind(docs, "PrometheusRule")
    check(rule["metadata"]["labels"].get("release") == "prometheus", "PrometheusRule carries its labels")
    groups = rule["spec"]["groups"]
    source = yaml.safe_load((CHART / "files" / "alert-rules.yaml").read_text())
    check([g["name"] for g in groups] == [g["name"] for g in source["groups"]], "the rules come from files/alert-rules.yaml")
    alerts = [r["alert"] for g in groups for r in g["rules"]]
    expected = [r["alert"] for g in source["groups"] for r in g["rules"]]
    check(alerts == expected and len(alerts) >= 11, f"every alert of the rules file: {alerts}")
    for g in groups:
        for r in g["rules"]:
            url = r["annotations"]["runbook_url"]
            check(url.startswith("https://wiki.example.com/ktb/runbooks.md#"), f"runbook base rewritten: {url}")
            check(url.endswith("#" + r["alert"].lower()), f"runbook anchor per alert: {url}")
            check(r["annotations"]["summary"] and r["annotations"]["description"], "summary and description")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"groups": groups}, f)
    subprocess.run(["promtool", "check", "rules", f.name], check=True)
    check(True, "promtool accepts the rendered groups")
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (service,) = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    port_names = [p["name"] for p in service["spec"]["ports"]]
    check(monitor["spec"]["endpoints"][0]["port"] in port_names, "the ServiceMonitor scrapes a Service port")
    check(monitor["spec"]["endpoints"][0]["path"] == "/metrics", "it scrapes /metrics")


def check_readme_values() -> None:
    """The chart's README has a row for every value of values.schema.json."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()

    def leaves(node: dict, path: str) -> list[str]:
        out = []
        for k, v in node.get("properties", {}).items():
            if v.get("properties"):
                out += leaves(v, f"{path}{k}.")
                continue
            out.append(path + k)
            items = v.get("items")
            if isinstance(items, dict) and items.get("properties"):
                out += leaves(items, f"{path}{k}[].")
        return out

    missing = [p for p in leaves(schema, "") if f"| `{p}` |" not in readme]
    check(not missing, f"helm/kraken-token-broker/README.md's values table lacks: {missing}")


def check_runbooks() -> None:
    """Every alert's runbook_url points at a heading of proto-docs/runbooks.md."""
    headings = {
        line[3:].strip().lower()
        for line in (ROOT / "proto-docs" / "runbooks.md").read_text().splitlines()
        if line.startswith("## ")
    }
    source = yaml.safe_load((CHART / "files" / "alert-rules.yaml").read_text())
    for group in source["groups"]:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
            check(anchor in headings, f"runbooks.md has a section for {rule['alert']} (#{anchor})")


def replicas(docs: list[dict], values: dict) -> list[tuple[int, dict]]:
    """Each replica's StatefulSet, by its number, in order."""
    sets = by_kind(docs, "StatefulSet")
    numbered = sorted((int(s["spec"]["template"]["metadata"]["labels"][REPLICA_LABEL]), s) for s in sets)
    check([n for n, _ in numbered] == list(range(values["replicaCount"])), f"one StatefulSet per replica: {numbered}")
    return numbered


def check_workload(docs: list[dict], values: dict) -> None:
    sets = replicas(docs, values)
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    (service,) = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    for n, sts in sets:
        check(sts["metadata"]["name"] == f"ktb-kraken-token-broker-{n}", f"replica {n}'s name")
        check(sts["spec"]["replicas"] == 1, "one pod per replica: its key is used by one process at a time")
        check([s["metadata"]["name"] for s in headless] == [sts["spec"]["serviceName"]], "a governing headless Service")
        selector = sts["spec"]["selector"]["matchLabels"]
        check(selector.get(REPLICA_LABEL) == str(n), "each StatefulSet selects only its own pod")
        labels = sts["spec"]["template"]["metadata"]["labels"]
        check(all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), "the Service selects every replica")
        check_pod(sts, values, n)


def check_pod(sts: dict, values: dict, replica: int) -> None:
    pod = sts["spec"]["template"]["spec"]
    check(pod["automountServiceAccountToken"] is False, "no service account token in the pod")
    psc = pod["securityContext"]
    check(psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, "pod runs as non-root")
    check(psc["seccompProfile"]["type"] == "RuntimeDefault", "pod seccomp RuntimeDefault")
    (c,) = pod["containers"]
    image = values["image"]
    if image.get("digest"):
        check(c["image"] == f"{image['repository']}@{image['digest']}", f"the image by digest: {c['image']}")
    else:
        check(c["image"] == f"{image['repository']}:{image['tag'] or '0.1.0'}", f"the image by tag: {c['image']}")
    # What the image is tested with: exactly these.
    sc = c["securityContext"]
    check(sc == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }, f"the container's securityContext: {sc}")
    check(c["startupProbe"]["httpGet"]["path"] == "/healthz", "startupProbe on /healthz (no restart loop on a rejected key)")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readinessProbe on /readyz")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "livenessProbe on /healthz")
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        check(c[probe]["httpGet"]["port"] == "admin", f"{probe} on the admin port")
    check(c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"], "resources set")
    check_identity_mounts(pod, c, values)
    # Drain: twice kraken.timeout plus 5 s, which the grace period must exceed.
    timeout_s = int(values["kraken"]["timeout"].rstrip("s"))
    check(pod["terminationGracePeriodSeconds"] > 2 * timeout_s + 5, "grace period above the drain time")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    check("subPath" not in mounts["keys"], "keys mounted as a directory, no subPath")
    check(mounts["keys"]["readOnly"] is True, "keys mounted read-only")
    keys_volume = next(v for v in pod["volumes"] if v["name"] == "keys")
    check(keys_volume["secret"]["defaultMode"] == 0o440, "key files not world-readable")
    check(keys_volume["secret"]["secretName"] == f"ktb-kraken-token-broker-keys-{replica}", "its own keys Secret")
    files = [(a["name"], f) for a in values["accounts"] for f in key_files(a)]
    items = keys_volume["secret"]["items"]
    check([(i["key"], i["path"]) for i in items] == [(f"{a}.{f}", f"{a}/{f}") for a, f in files], f"key files: {items}")
    env = {e["name"]: e for e in c["env"]}
    check(env["KTB_REPLICA"]["value"] == str(replica), "each pod knows which replica it is")
    check("--reload-poll" in c["args"], "the broker re-reads its config and rotated secrets")
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    check([k for k in annotations if k.startswith("checksum/")] == ["checksum/listen"], f"only [listen] restarts pods: {annotations}")
    for extra in values.get("extraEnv", []):
        check(env[extra["name"]]["value"] == extra["value"], f"extra env {extra['name']}")
    spread = pod["topologySpreadConstraints"]
    if values["topologySpreadConstraints"]:
        check(spread == values["topologySpreadConstraints"], "own spread constraints replace the default")
    else:
        (default,) = spread
        check(default["topologyKey"] == "kubernetes.io/hostname" and default["whenUnsatisfiable"] == "ScheduleAnyway",
              f"replicas spread across nodes by default: {default}")
        selector = dict(sts["spec"]["selector"]["matchLabels"])
        selector.pop(REPLICA_LABEL)
        check(default["labelSelector"]["matchLabels"] == selector, "spread over every replica's pod of this release")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports == {"api": 8080, "admin": 9090}, f"api and admin ports: {ports}")


def key_files(account: dict) -> list[str]:
    extra = {"none": [], "static": ["otp"], "totp": ["totp-secret"]}[account.get("otp", "none")]
    return ["api-key", "api-secret", *extra]


def secrets_read_by(pod: dict) -> set[str]:
    """Every Secret a pod spec can read: volumes (secret, projected), and
    every container's env and envFrom."""
    names = set()
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for c in pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                names.add(e["secretRef"]["name"])
    return names


def pod_specs(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(pod template metadata, pod spec) of every pod-making object."""
    out = []
    for d in docs:
        if d["kind"] == "Pod":
            out.append((d["metadata"], d["spec"]))
        elif d["kind"] == "CronJob":
            t = d["spec"]["jobTemplate"]["spec"]["template"]
            out.append((t["metadata"], t["spec"]))
        elif d["kind"] in POD_KINDS:
            t = d["spec"]["template"]
            out.append((t["metadata"], t["spec"]))
    return out


def check_key_isolation(docs: list[dict], values: dict) -> None:
    """No pod spec can read another replica's keys: each replica's pod reads
    exactly one key Secret, its own, and no other pod reads any. With
    keysSecret.create, each Secret holds only its replica's key material."""
    prefix = "ktb-kraken-token-broker-keys"
    key_secrets = {f"{prefix}-{n}" for n in range(values["replicaCount"])} | {prefix}
    pods = pod_specs(docs)
    seen = []
    for metadata, pod in pods:
        replica = metadata.get("labels", {}).get(REPLICA_LABEL)
        readable = secrets_read_by(pod) & key_secrets
        if replica is None:
            check(not readable, f"a pod that is no replica reads no keys: {readable}")
            continue
        seen.append(int(replica))
        check(readable == {f"{prefix}-{replica}"}, f"replica {replica}'s pod reads only its own keys: {sorted(readable)}")
    check(sorted(seen) == list(range(values["replicaCount"])), f"a pod per replica: {seen}")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    if values["keysSecret"]["create"]:
        data = values["keysSecret"]["data"]
        for n in range(values["replicaCount"]):
            held = secrets[f"{prefix}-{n}"]["stringData"]
            wanted = {f"{a['name']}.{f}": data[f"{a['name']}.{n}.{f}"] for a in values["accounts"] for f in key_files(a)}
            check(held == wanted, f"Secret {prefix}-{n} holds replica {n}'s key material and nothing else")
        check(set(secrets) & key_secrets == key_secrets - {prefix}, f"one key Secret per replica: {sorted(secrets)}")
    else:
        check(not secrets, "no Secret (no key material) unless keysSecret.create")
    print(f"{values['replicaCount']} replicas: each pod reads only its own keys Secret")


def check_restarts(chart) -> None:
    """A setting the broker reloads live leaves the pod template alone; one it
    cannot ([listen]: TLS on or off, i.e. the listen section) changes it."""
    def template_of(mutate) -> dict:
        values = defaults()
        mutate(values)
        (_, sts), *_ = replicas(render(chart, values), values)
        return sts["spec"]["template"]

    base = template_of(lambda v: None)
    for what, mutate in [
        ("a refresh setting", lambda v: v["refresh"].update(jitter="10s")),
        ("a new consumer", lambda v: v["consumers"].append({"name": "c2", "credentialSha256": "ab" * 32, "accounts": ["main"]})),
        ("an account's expiry", lambda v: v["accounts"][0].update(keyExpiresAt="2027-01-01T00:00:00Z")),
        ("kraken.keyInfoInterval", lambda v: v["kraken"].update(keyInfoInterval="30m")),
        ("a consumer's relay settings", lambda v: v["consumers"][0].update(relay={"allow": ["ping"]}, relayOnly=True)),
    ]:
        check(template_of(mutate) == base, f"{what} is reloaded live: no restart")
    listen = base["metadata"]["annotations"]["checksum/listen"]
    tls = template_of(lambda v: v["tls"].update(enabled=True))
    check(tls["metadata"]["annotations"]["checksum/listen"] != listen, "turning TLS on restarts the pods")


def check_dashboard(chart) -> None:
    text = (CHART / "files" / "dashboard.json").read_text()
    values = everything_enabled()
    (dash,) = [d for d in by_kind(render(chart, values), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    check(dash["metadata"]["labels"]["grafana_dashboard"] == "1" and dash["metadata"]["labels"]["team"] == "trading",
          "the dashboard carries the sidecar's label and the given ones")
    check(dash["metadata"]["annotations"] == {"grafana_folder": "Trading"}, "the dashboard's annotations")
    check(json.loads(dash["data"]["kraken-token-broker.json"]) == json.loads(text), "the dashboard is files/dashboard.json")
    values["dashboard"]["enabled"] = False
    check(not [d for d in render(chart, values) if d["metadata"]["name"].endswith("-dashboard")], "dashboard.enabled=false")


def check_identity_mounts(pod: dict, c: dict, values: dict) -> None:
    """TLS, client CA, the broker's own ServiceAccount token and the audit key
    are mounted exactly when enabled, read-only, not world-readable."""
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tls = values["tls"]
    wanted = {
        "tls": tls["enabled"],
        "client-ca": tls["enabled"] and bool(tls["clientCaSecret"]),
        "kube-api-access": values["kubernetes"]["enabled"],
        "audit-key": values["audit"]["enabled"],
    }
    for name, enabled in wanted.items():
        check((name in mounts) == enabled and (name in volumes) == enabled, f"{name} mounted iff enabled")
        if enabled:
            check(mounts[name]["readOnly"] is True and "subPath" not in mounts[name], f"{name} read-only, no subPath")
            source = volumes[name].get("secret") or volumes[name].get("projected")
            check(source["defaultMode"] == 0o440, f"{name} not world-readable")
    if wanted["kube-api-access"]:
        sources = volumes["kube-api-access"]["projected"]["sources"]
        (sa_token,) = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
        check(sa_token["expirationSeconds"] <= 3600, "the broker's own token is short-lived")
        check("audience" not in sa_token, "the broker's own token is for the API server")
        check(mounts["kube-api-access"]["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount", "where the broker looks")
        check(pod["automountServiceAccountToken"] is False, "no automounted long-lived token beside it")
    if wanted["tls"]:
        check(volumes["tls"]["secret"]["secretName"] == "ktb-kraken-token-broker-tls", "the Secret cert-manager writes")


def check_certificate(docs: list[dict], values: dict) -> None:
    (cert,) = by_kind(docs, "Certificate")
    spec = cert["spec"]
    check(spec["secretName"] == "ktb-kraken-token-broker-tls", "the Certificate writes the mounted Secret")
    check("ktb-kraken-token-broker.trading.svc" in spec["dnsNames"], f"the Service name in the certificate: {spec['dnsNames']}")
    check("ktb.trading.example.com" in spec["dnsNames"], "extra DNS names")
    check(spec["issuerRef"] == values["tls"]["certManager"]["issuerRef"], "the issuer given")
    check(spec["privateKey"]["rotationPolicy"] == "Always", "a renewal rotates the key")


def check_policies(docs: list[dict], values: dict) -> None:
    if values["replicaCount"] >= 2:
        (pdb,) = by_kind(docs, "PodDisruptionBudget")
        check(pdb["spec"]["maxUnavailable"] == 1, "PDB maxUnavailable 1")
        sts = by_kind(docs, "StatefulSet")[0]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        check(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
              and REPLICA_LABEL not in pdb["spec"]["selector"]["matchLabels"], "one budget over every replica")
    else:
        check(not by_kind(docs, "PodDisruptionBudget"), "no PodDisruptionBudget with one replica: it would protect nothing")
    (sa,) = by_kind(docs, "ServiceAccount")
    check(sa["automountServiceAccountToken"] is False, "ServiceAccount does not automount")
    (np,) = by_kind(docs, "NetworkPolicy")
    api_rule, admin_rule = np["spec"]["ingress"]
    check(api_rule["ports"][0]["port"] == "api", "first ingress rule is the API port")
    sources = api_rule["from"]
    check(sources[0]["podSelector"]["matchLabels"] == values["networkPolicy"]["consumerPodLabels"], "consumer pods")
    listed = [s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in sources[1:]]
    check(listed == values["networkPolicy"]["consumerNamespaces"], f"listed namespaces: {listed}")
    check(admin_rule["ports"][0]["port"] == "admin", "second ingress rule is the admin port")
    monitoring = admin_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    check(monitoring == values["networkPolicy"]["monitoringNamespace"], "admin only from monitoring")
    (dns,) = [r for r in np["spec"]["egress"] if r["ports"][0]["port"] == 53]
    check(len(dns.get("to", [])) == 1, f"DNS egress names the cluster DNS: {dns}")
    (peer,) = dns["to"]
    dns_values = values["networkPolicy"]["dns"]
    check(peer == {"namespaceSelector": {"matchLabels": dns_values["namespaceLabels"]},
                   "podSelector": {"matchLabels": dns_values["podLabels"]}}, f"DNS only to the cluster DNS pods: {dns}")
    for rule in np["spec"]["egress"]:
        check(rule.get("to"), f"every egress rule names where it may go: {rule}")
    egress_ports = sorted(p["port"] for rule in np["spec"]["egress"] for p in rule["ports"])
    expected = sorted([53, 53] + values["networkPolicy"]["egressPorts"])
    if values["kubernetes"]["enabled"]:
        expected = sorted(expected + [values["kubernetes"]["apiServerPort"]])
        (api_rule,) = [r for r in np["spec"]["egress"] if r["ports"][0]["port"] == values["kubernetes"]["apiServerPort"]]
        cidrs = [t["ipBlock"]["cidr"] for t in api_rule["to"]]
        check(cidrs == values["kubernetes"]["apiServerCidrs"], f"egress to the API server only at its addresses: {cidrs}")
    check(egress_ports == expected, f"egress only DNS, HTTPS (and the API server): {egress_ports}")
    bindings = by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "ClusterRole")
    if values["kubernetes"]["enabled"]:
        (binding,) = bindings
        (role,) = roles
        check(binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
              "bound to the chart's own role")
        expected_rules = [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"nonResourceURLs": ["/openid/v1/jwks"], "verbs": ["get"]},
        ]
        check(role["rules"] == expected_rules, f"TokenReview create and the signing keys' read, nothing more: {role['rules']}")
        (subject,) = binding["subjects"]
        check(subject["name"] == sa["metadata"]["name"] and subject["namespace"] == "trading", "bound to the broker's ServiceAccount")
    else:
        check(not bindings and not roles, "no cluster-wide role or binding unless kubernetes.enabled")


def broker_toml(docs: list[dict]) -> str:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if "broker.toml" in d.get("data", {})]
    return cm["data"]["broker.toml"]


def check_config_accepted(docs: list[dict], binary: str, values: dict) -> None:
    """The rendered broker.toml passes check-config: with --no-secrets (key
    paths as rendered), and in each replica's pod, whose keys directory holds only
    its own Secret's files (moved to a temp dir with the other mounts)."""
    text = broker_toml(docs)
    env_base = {"PATH": "/usr/bin:/bin"}
    if values["kubernetes"]["enabled"]:
        env_base.update(KUBERNETES_SERVICE_HOST="10.0.0.1", KUBERNETES_SERVICE_PORT="443")
    data = values["keysSecret"].get("data") or {}
    defaults = {"api-key": "KEY", "api-secret": "AAECAw==", "otp": "pass", "totp-secret": "JBSWY3DPEHPK3PXP"}
    with tempfile.TemporaryDirectory() as tmp:
        mounts = {"/var/run/secrets/kubernetes.io/serviceaccount": f"{tmp}/sa"}
        if values["tls"]["enabled"]:
            # A certificate and key as cert-manager writes them, and a client CA.
            for d, name in [("tls", "tls"), ("client-ca", "ca")]:
                (Path(tmp) / d).mkdir()
                subprocess.run(
                    ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-subj", "/CN=ktb", "-days", "2", "-keyout", f"{tmp}/{d}/{name}.key", "-out", f"{tmp}/{d}/{name}.crt"],
                    check=True, capture_output=True,
                )
            for d in ["tls", "client-ca"]:
                mounts[f"/etc/kraken-token-broker/{d}"] = f"{tmp}/{d}"
        if values["audit"]["enabled"]:
            (Path(tmp) / "audit").mkdir()
            (Path(tmp) / "audit" / "fingerprint-key").write_text("a-fingerprint-key-of-32-bytes-ok\n")
            mounts["/etc/kraken-token-broker/audit"] = f"{tmp}/audit"
        if values["kubernetes"]["enabled"]:
            # What the projected volume holds.
            sa = Path(tmp) / "sa"
            sa.mkdir()
            (sa / "token").write_text("the-brokers-own-token\n")
            (sa / "ca.crt").write_text((Path(tmp) / "tls" / "tls.crt").read_text())
        # As rendered, reading no secret (certificates and CAs are public:
        # they are read from where the pod would have them).
        public = text
        for mount, there in mounts.items():
            public = public.replace(mount, there)
        as_rendered = Path(tmp) / "as-rendered.toml"
        as_rendered.write_text(public)
        result = subprocess.run([binary, "check-config", "--no-secrets", "--config", str(as_rendered)],
                                capture_output=True, text=True, env=env_base)
        check(result.returncode == 0, f"check-config --no-secrets accepts the rendered config:\n{result.stderr}\n{public}")
        check("/etc/kraken-token-broker/keys/main/api-key" in result.stdout, "--no-secrets: the keys where the pod has them")
        for replica in range(values["replicaCount"]):
            keys = Path(tmp) / f"keys-{replica}"
            for account in values["accounts"]:
                d = keys / account["name"]
                d.mkdir(parents=True)
                for key in key_files(account):
                    (d / key).write_text(data.get(f"{account['name']}.{replica}.{key}", defaults[key]) + "\n")
            pod_text = text.replace("/etc/kraken-token-broker/keys", str(keys))
            for mount, there in mounts.items():
                pod_text = pod_text.replace(mount, there)
            config = Path(tmp) / f"broker-{replica}.toml"
            config.write_text(pod_text)
            result = subprocess.run([binary, "check-config", "--config", str(config)], capture_output=True, text=True, env=env_base)
            check(result.returncode == 0, f"the broker accepts the rendered config (replica {replica}):\n{result.stderr}\n{pod_text}")
            check(f"/keys-{replica}/main/api-key" in result.stdout, f"replica {replica} reads its own key: {result.stdout}")
            for value in data.values():
                check(value not in result.stdout, "check-config prints no secret")


def check_notes(chart) -> None:
    """NOTES' commands create each replica's keys Secret with every file its
    pod mounts, 2FA files included, and nothing else."""
    values = defaults()
    values["replicaCount"] = 3
    values["accounts"] = [{"name": "main", "otp": "none"}, {"name": "alt", "otp": "static"}, {"name": "twofa", "otp": "totp"}]
    values["consumers"][0]["accounts"] = ["main"]
    out = chart.render(values, name="ktb", namespace="trading")
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    commands = notes.split("create secret generic ")[1:]
    sets = replicas(docs, values)
    check(len(commands) == len(sets), "a command per replica's Secret")
    for (n, sts), command in zip(sets, commands):
        keys = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys")["secret"]
        check(command.startswith(keys["secretName"] + " "), f"NOTES creates {keys['secretName']}")
        created = command.split("--dry-run")[0]
        for item in keys["items"]:
            check(f"--from-file={item['key']}=" in created, f"NOTES creates {item['key']} in replica {n}'s Secret")
        check(created.count("--from-file=") == len(keys["items"]), "and nothing else")


def check_schema_refusals(chart) -> None:
    chart.validate_schema(defaults())
    chart.validate_schema(everything_enabled())
    bad = {
        "replicaCount 0": ("replicaCount", lambda v: v.update(replicaCount=0)),
        "an account name with capitals": ("name", lambda v: v["accounts"][0].update(name="Main")),
        "an unknown otp kind": ("otp", lambda v: v["accounts"][0].update(otp="sms")),
        "a short credential hash": ("credentialSha256", lambda v: v["consumers"][0].update(credentialSha256="abc")),
        "no consumers": ("consumers", lambda v: v.update(consumers=[])),
        "a non-HTTPS REST URL": ("restUrl", lambda v: v["kraken"].update(restUrl="ftp://api.kraken.com")),
        "a duration that is not one": ("timeout", lambda v: v["kraken"].update(timeout="soon")),
        "a port out of range": ("apiPort", lambda v: v["service"].update(apiPort=70000)),
        "an unknown top-level key": ("colour", lambda v: v.update(colour="red")),
        "a grace period under the drain time": (
            "terminationGracePeriodSeconds",
            lambda v: v.update(terminationGracePeriodSeconds=5),
        ),
        "a bad key name in keysSecret.data": ("main.password", lambda v: v["keysSecret"].update(data={"main.password": "x"})),
        "an egress CIDR that is not one": ("egressCidrs", lambda v: v["networkPolicy"].update(egressCidrs=["kraken"])),
        "a consumer with two identities": (
            "consumers",
            lambda v: v["consumers"][0].update(clientCertSan="spiffe://x/y"),
        ),
        "a consumer with no identity": ("consumers", lambda v: v["consumers"][0].pop("credentialSha256")),
        "a DNS SAN with a scheme": (
            "dns",
            lambda v: v["consumers"].append({"name": "c", "clientCert": {"dns": "spiffe://x/y"}, "accounts": ["main"]}),
        ),
        "a client certificate naming both SAN types": (
            "clientCert",
            lambda v: v["consumers"].append({"name": "c", "clientCert": {"dns": "a", "uri": "spiffe://b"}, "accounts": ["main"]}),
        ),
        "a ServiceAccount without a namespace": (
            "namespace",
            lambda v: v["consumers"].append({"name": "sa", "serviceAccount": {"name": "x"}, "accounts": ["main"]}),
        ),
        "a rate limit of zero": (
            "perSecond",
            lambda v: v["consumers"][0].update(rateLimit={"perSecond": 0, "burst": 1}),
        ),
        "an unknown tls key": ("certificate", lambda v: v["tls"].update(certificate="x")),
        "an extra env var that overrides KTB_REPLICA": ("extraEnv", lambda v: v.update(extraEnv=[{"name": "KTB_REPLICA", "value": "0"}])),
        "an egress port out of range": ("egressPorts", lambda v: v["networkPolicy"].update(egressPorts=[0])),
        "a digest that is a tag": ("digest", lambda v: v["image"].update(digest="latest")),
        "max_rejected_calls of 0": ("maxRejectedCalls", lambda v: v["kraken"].update(maxRejectedCalls=0)),
        "a key expiry that is no RFC 3339 time": ("keyExpiresAt", lambda v: v["accounts"][0].update(keyExpiresAt="March 2027")),
        "forbidding the permission every key needs": (
            "forbidPermissions",
            lambda v: v["accounts"][0].update(forbidPermissions=["create-ws-token"]),
        ),
        "the removed keysSecret.existingSecret": ("existingSecret", lambda v: v["keysSecret"].update(existingSecret="x")),
        "DNS to no pods in particular": ("podLabels", lambda v: v["networkPolicy"]["dns"].update(podLabels={"k8s-app": None})),
        "a dashboard label that is no string": ("grafana_dashboard", lambda v: v["dashboard"].update(labels={"grafana_dashboard": 1})),
        "a relay method Kraken does not have": ("allow", lambda v: v["consumers"][0].update(relay={"allow": ["withdraw"]})),
        "a channel on a method that takes none": ("allow", lambda v: v["consumers"][0].update(relay={"allow": ["add_order:executions"]})),
        "relay connections of 0": ("maxConnections", lambda v: v["consumers"][0].update(relay={"maxConnections": 0})),
        "relay connections over 10000": ("maxConnections", lambda v: v["consumers"][0].update(relay={"maxConnections": 10001})),
        "an unknown relay key": ("methods", lambda v: v["consumers"][0].update(relay={"methods": ["ping"]})),
        "relayOnly that is no boolean": ("relayOnly", lambda v: v["consumers"][0].update(relayOnly="yes")),
    }
    for what, (names, mutate) in bad.items():
        values = copy.deepcopy(defaults())
        mutate(values)
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError as e:
            check(names in str(e), f"the refusal of {what} names `{names}`: {e}")
            continue
        raise AssertionError(f"the schema accepted {what}")
    # A pattern's refusal says, in words, what the value must be.
    for path, mutate, must in [
        ("/kraken/timeout", lambda v: v["kraken"].update(timeout="soon"), "value must be 'a duration such as 30s, 5m, 1h or 1m30s'"),
        ("/accounts/0/keyExpiresAt", lambda v: v["accounts"][0].update(keyExpiresAt="2027-03-01"),
         "value must be 'an RFC 3339 UTC time like 2027-03-01T00:00:00Z'"),
        ("/consumers/0/credentialSha256", lambda v: v["consumers"][0].update(credentialSha256="abc"), "value must be '64 hex digits"),
        ("/consumers/0/relay/allow/0", lambda v: v["consumers"][0].update(relay={"allow": ["add_order:executions"]}),
         "value must be 'a Kraken WebSocket v2 method"),
    ]:
        values = copy.deepcopy(defaults())
        mutate(values)
        try:
            chart.validate_schema(values)
            raise AssertionError(f"the schema accepted a bad {path}")
        except helm.HelmValuesError as e:
            lines = [line for line in str(e).splitlines() if f"at '{path}'" in line]
            check(any(must in line for line in lines), f"the refusal of {path} says {must!r}: {e}")
    schema = json.loads((CHART / "values.schema.json").read_text())

    def undescribed(node: dict, path: str) -> list[str]:
        out = []
        for k, v in node.get("properties", {}).items():
            out += ([] if "description" in v else [path + k]) + undescribed(v, f"{path}{k}.")
        return out + (undescribed(node["items"], path) if isinstance(node.get("items"), dict) else [])

    check(not undescribed(schema, ""), f"every value has a description: {undescribed(schema, '')}")
    print(f"schema refuses {len(bad)} kinds of bad values")


def check_template_refusals(chart) -> None:
    for what, mutate, needle in [
        ("a consumer granted an unknown account", lambda v: v["consumers"][0].update(accounts=["nope"]), "not in accounts"),
        ("an account listed twice", lambda v: v["accounts"].append({"name": "main"}), "listed twice"),
        (
            "a created Secret missing a key",
            lambda v: v["keysSecret"].update(create=True, data={"main.0.api-key": "K"}),
            "main.0.api-secret",
        ),
        (
            "a ServiceAccount consumer without kubernetes.enabled",
            lambda v: v["consumers"].append({"name": "sa", "serviceAccount": {"namespace": "t", "name": "x"}, "accounts": ["main"]}),
            "set kubernetes.enabled",
        ),
        (
            "a certificate consumer without client certificates",
            lambda v: v["consumers"].append({"name": "c", "clientCertSan": "spiffe://x", "accounts": ["main"]}),
            "tls.clientCaSecret",
        ),
        ("audit without a key", lambda v: v["audit"].update(enabled=True), "audit.fingerprintKeySecret"),
        (
            "TokenReviews without egress to the API server",
            lambda v: v["kubernetes"].update(enabled=True),
            "kubernetes.apiServerCidrs",
        ),
        (
            "cert-manager without an issuer",
            lambda v: v["tls"].update(enabled=True, certManager={**v["tls"]["certManager"], "enabled": True}),
            "issuerRef.name",
        ),
    ]:
        values = defaults()
        mutate(values)
        try:
            chart.render(values, name="ktb", namespace="trading")
        except helm.HelmRenderError as e:
            check(needle in str(e), f"the refusal of {what} says `{needle}`: {e}")
            continue
        raise AssertionError(f"the chart rendered {what}")


def main() -> None:
    binary = sys.argv[1]
    chart = helm.Chart.load(str(CHART))
    lint(None, "defaults")
    lint(everything_enabled(), "everything enabled")

    plain = render(chart, defaults())
    kinds = sorted(d["kind"] for d in plain)
    check(
        kinds == ["ConfigMap", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "ServiceAccount",
                  "StatefulSet", "StatefulSet"],
        f"default kinds: {kinds}",
    )
    validate_kinds(plain, "defaults")
    check_workload(plain, defaults())
    check_key_isolation(plain, defaults())
    check_policies(plain, defaults())
    check_config_accepted(plain, binary, defaults())

    one = defaults()
    one["replicaCount"] = 1
    single = render(chart, one)
    check_workload(single, one)
    check_policies(single, one)

    full_values = everything_enabled()
    full = render(chart, full_values)
    kinds = sorted(d["kind"] for d in full)
    check("ServiceMonitor" in kinds and "PrometheusRule" in kinds and "Secret" in kinds, f"all kinds: {kinds}")
    validate_kinds(full, "everything enabled")
    check_workload(full, full_values)
    check_key_isolation(full, full_values)
    check_policies(full, full_values)
    check_prometheus_rule(full)
    check_certificate(full, full_values)
    check_config_accepted(full, binary, full_values)
    check_config_keys(check, json.loads((CHART / "values.schema.json").read_text()), full_values, broker_toml(full))

    check_restarts(chart)
    check_dashboard(chart)
    check_schema_refusals(chart)
    check_template_refusals(chart)
    check_notes(chart)
    check_runbooks()
    check_readme_values()
    print(f"chart checks passed ({checks} assertions)")


if __name__ == "__main__":
    main()
