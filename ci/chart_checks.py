"""Conformance checks of the Helm chart, with no helm binary and no cluster.

- helm-python-sdk (Helm's own Go SDK) lints the chart: no warning, no error;
- it renders with the default values and with every optional part enabled;
- values.schema.json refuses bad values, each kind with a message naming it;
- every rendered built-in kind passes kubernetes-validate --strict for
  Kubernetes 1.29 and 1.33;
- the rendered PrometheusRule's groups pass `promtool check rules`;
- the StatefulSet's pod security settings, probes, mounts, per-replica keys
  and grace period are what the chart promises;
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

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kraken-token-broker"
KUBE_VERSIONS = ["1.29.0", "1.33.0"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}

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
    v["replicaCount"] = 2
    v["accounts"] = [{"name": "main", "otp": "none"}, {"name": "alt", "otp": "static"}, {"name": "twofa", "otp": "totp"}]
    v["consumers"] = [
        {"name": "mm-btc", "credentialSha256": "ab" * 32, "accounts": ["main"]},
        {"name": "mm-eth", "credentialSha256": "cd" * 32, "accounts": ["main", "alt", "twofa"], "rateLimit": {"perSecond": 20, "burst": 40}},
        {"name": "mm-sol", "serviceAccount": {"namespace": "trading", "name": "mm-sol"}, "accounts": ["main"]},
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
    v["kubernetes"] = {"enabled": True, "audience": "kraken-token-broker", "cacheTtl": "30s", "apiServerCidrs": ["10.0.0.1/32"], "apiServerPort": 6443}
    v["audit"] = {"enabled": True, "fingerprintKeySecret": "ktb-audit"}
    data = {}
    for replica in range(2):
        for account, extra in [("main", None), ("alt", ("otp", "static-pass")), ("twofa", ("totp-secret", "JBSWY3DPEHPK3PXP"))]:
            data[f"{account}.{replica}.api-key"] = f"KEY-{account}-{replica}"
            data[f"{account}.{replica}.api-secret"] = "AAECAwQFBgc="
            if extra:
                data[f"{account}.{replica}.{extra[0]}"] = extra[1]
    v["keysSecret"] = {"create": True, "existingSecret": "", "data": data}
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


def check_workload(docs: list[dict], values: dict) -> None:
    (deploy,) = by_kind(docs, "StatefulSet")
    check(deploy["spec"]["replicas"] == values["replicaCount"], "replicas")
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    check([s["metadata"]["name"] for s in headless] == [deploy["spec"]["serviceName"]], "a governing headless Service")
    pod = deploy["spec"]["template"]["spec"]
    check(pod["automountServiceAccountToken"] is False, "no service account token in the pod")
    psc = pod["securityContext"]
    check(psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, "pod runs as non-root")
    check(psc["seccompProfile"]["type"] == "RuntimeDefault", "pod seccomp RuntimeDefault")
    (c,) = pod["containers"]
    sc = c["securityContext"]
    check(sc["readOnlyRootFilesystem"] is True, "read-only root filesystem")
    check(sc["allowPrivilegeEscalation"] is False, "no privilege escalation")
    check(sc["capabilities"]["drop"] == ["ALL"], "all capabilities dropped")
    check(sc["runAsNonRoot"] is True, "container runs as non-root")
    check(sc["seccompProfile"]["type"] == "RuntimeDefault", "container seccomp RuntimeDefault")
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
    # One key pair per replica: pod N reads N/<account>/..., picked by KTB_REPLICA.
    files_per_replica = sum(2 + (a.get("otp", "none") != "none") for a in values["accounts"])
    items = keys_volume["secret"]["items"]
    check(len(items) == values["replicaCount"] * files_per_replica, f"{len(items)} key files mounted")
    for item in items:
        account, replica, file = item["key"].split(".")
        check(item["path"] == f"{replica}/{account}/{file}", f"key {item['key']} at {item['path']}")
    env = {e["name"]: e for e in c["env"]}
    check(
        env["KTB_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']",
        "each pod knows its ordinal",
    )
    check("--reload-poll" in c["args"], "the broker re-reads rotated secrets")
    check("checksum/config" in deploy["spec"]["template"]["metadata"]["annotations"], "config checksum rolls pods")
    for extra in values.get("extraEnv", []):
        check(env[extra["name"]]["value"] == extra["value"], f"extra env {extra['name']}")
    spread = pod["topologySpreadConstraints"]
    if values["topologySpreadConstraints"]:
        check(spread == values["topologySpreadConstraints"], "own spread constraints replace the default")
    else:
        (default,) = spread
        check(default["topologyKey"] == "kubernetes.io/hostname" and default["whenUnsatisfiable"] == "ScheduleAnyway",
              f"replicas spread across nodes by default: {default}")
        check(default["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"], "spread over this release's pods")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports == {"api": 8080, "admin": 9090}, f"api and admin ports: {ports}")


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
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    check(pdb["spec"]["maxUnavailable"] == 1, "PDB maxUnavailable 1")
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
            {"nonResourceURLs": ["/openid/v1/jwks", "/.well-known/openid-configuration"], "verbs": ["get"]},
        ]
        check(role["rules"] == expected_rules, f"TokenReview create and the signing keys' read, nothing more: {role['rules']}")
        (subject,) = binding["subjects"]
        check(subject["name"] == sa["metadata"]["name"] and subject["namespace"] == "trading", "bound to the broker's ServiceAccount")
    else:
        check(not bindings and not roles, "no cluster-wide role or binding unless kubernetes.enabled")


def check_config_accepted(docs: list[dict], binary: str, values: dict) -> None:
    """The rendered broker.toml, with secret paths moved to a temp dir, passes
    check-config for every replica (each with its own ordinal)."""
    (cm,) = by_kind(docs, "ConfigMap")
    text = cm["data"]["broker.toml"]
    data = values["keysSecret"].get("data") or {}
    defaults = {"api-key": "KEY", "api-secret": "AAECAw==", "otp": "pass", "totp-secret": "JBSWY3DPEHPK3PXP"}
    with tempfile.TemporaryDirectory() as tmp:
        for replica in range(values["replicaCount"]):
            for account in values["accounts"]:
                d = Path(tmp) / str(replica) / account["name"]
                d.mkdir(parents=True)
                for key, default in defaults.items():
                    (d / key).write_text(data.get(f"{account['name']}.{replica}.{key}", default) + "\n")
        env_base = {"PATH": "/usr/bin:/bin"}
        text = text.replace("/etc/kraken-token-broker/keys", tmp)
        if values["tls"]["enabled"]:
            # A certificate and key as cert-manager writes them, and a client CA.
            for d, name in [("tls", "tls"), ("client-ca", "ca")]:
                (Path(tmp) / d).mkdir()
                subprocess.run(
                    ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-subj", "/CN=ktb", "-days", "2", "-keyout", f"{tmp}/{d}/{name}.key", "-out", f"{tmp}/{d}/{name}.crt"],
                    check=True, capture_output=True,
                )
            for d in ["tls", "client-ca", "audit"]:
                text = text.replace(f"/etc/kraken-token-broker/{d}", f"{tmp}/{d}")
        if values["audit"]["enabled"]:
            (Path(tmp) / "audit").mkdir()
            (Path(tmp) / "audit" / "fingerprint-key").write_text("a-fingerprint-key-of-32-bytes-ok\n")
        if values["kubernetes"]["enabled"]:
            # What the projected volume holds, and what the kubelet sets.
            sa = Path(tmp) / "sa"
            sa.mkdir()
            (sa / "token").write_text("the-brokers-own-token\n")
            (sa / "ca.crt").write_text((Path(tmp) / "tls" / "tls.crt").read_text())
            text = text.replace("[kubernetes]\n", f'[kubernetes]\nca = {{ file = "{sa}/ca.crt" }}\ntoken = {{ file = "{sa}/token" }}\n')
            env_base.update(KUBERNETES_SERVICE_HOST="10.0.0.1", KUBERNETES_SERVICE_PORT="443")
        config = Path(tmp) / "broker.toml"
        config.write_text(text)
        for replica in range(values["replicaCount"]):
            env = {**env_base, "KTB_REPLICA": str(replica)}
            result = subprocess.run([binary, "check-config", "--config", str(config)], capture_output=True, text=True, env=env)
            check(result.returncode == 0, f"the broker accepts the rendered config (replica {replica}):\n{result.stderr}\n{text}")
            check(f"/{replica}/main/api-key" in result.stdout, f"replica {replica} reads its own key: {result.stdout}")
            for value in data.values():
                check(value not in result.stdout, "check-config prints no secret")


def check_notes(chart) -> None:
    """NOTES' command for the keys Secret names every file the pods mount,
    2FA files included."""
    values = defaults()
    values["replicaCount"] = 2
    values["accounts"] = [{"name": "main", "otp": "none"}, {"name": "alt", "otp": "static"}, {"name": "twofa", "otp": "totp"}]
    values["consumers"][0]["accounts"] = ["main"]
    out = chart.render(values, name="ktb", namespace="trading")
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (sts,) = by_kind(docs, "StatefulSet")
    keys = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys")["secret"]["items"]
    for item in keys:
        check(f"--from-file={item['key']}=" in notes, f"NOTES creates {item['key']}, which the pods mount")
    check(notes.count("--from-file=") == len(keys), "and nothing else")


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
        kinds == ["ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "ServiceAccount", "StatefulSet"],
        f"default kinds: {kinds}",
    )
    check(not by_kind(plain, "Secret"), "no Secret (no key material) by default")
    validate_kinds(plain, "defaults")
    check_workload(plain, defaults())
    check_policies(plain, defaults())
    check_config_accepted(plain, binary, defaults())

    full_values = everything_enabled()
    full = render(chart, full_values)
    kinds = sorted(d["kind"] for d in full)
    check("ServiceMonitor" in kinds and "PrometheusRule" in kinds and "Secret" in kinds, f"all kinds: {kinds}")
    validate_kinds(full, "everything enabled")
    check_workload(full, full_values)
    check_policies(full, full_values)
    check_prometheus_rule(full)
    check_certificate(full, full_values)
    check_config_accepted(full, binary, full_values)

    check_schema_refusals(chart)
    check_template_refusals(chart)
    check_notes(chart)
    check_runbooks()
    print(f"chart checks passed ({checks} assertions)")


if __name__ == "__main__":
    main()
