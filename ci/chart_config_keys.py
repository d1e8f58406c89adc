"""Every key of the broker's config has a way in from the chart's values.

The config's keys are read from two references, so neither can grow a key
the chart misses: the parser itself (src/config/raw.rs: the sections the root
table is split into and every field of their serde structs, which refuse
unknown keys) and the operators' reference (README.md, "### Configuration":
every `key =` line, commented ones included).

Each key must appear in VALUES_OF below, either with the values key that sets
it or with the reason the chart sets it itself; then the check renders the
chart and proves the key is in the rendered broker.toml, with the value given
in values where it is a plain copy.
"""

import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# config key -> the values key that sets it, or "chart: <why the chart sets it>"
VALUES_OF: dict[str, str] = {
    "listen.api": "chart: the container's api port (8080); service.apiPort maps the Service onto it",
    "listen.admin": "chart: the container's admin port (9090); service.adminPort maps the Service onto it",
    "listen.tls.cert": "tls.secretName",
    "listen.tls.key": "tls.secretName",
    "listen.tls.client_ca": "tls.clientCaSecret",
    "kraken.rest_url": "kraken.restUrl",
    "kraken.ws_url": "kraken.wsUrl",
    "kraken.timeout": "kraken.timeout",
    "kraken.max_rejected_calls": "kraken.maxRejectedCalls",
    "kraken.key_info_interval": "kraken.keyInfoInterval",
    "refresh.refresh_before_expiry": "refresh.refreshBeforeExpiry",
    "refresh.min_served_ttl": "refresh.minServedTtl",
    "refresh.jitter": "refresh.jitter",
    "refresh.retry_initial": "refresh.retryInitial",
    "refresh.retry_max": "refresh.retryMax",
    "refresh.retry_rejected": "refresh.retryRejected",
    "kubernetes.audience": "kubernetes.audience",
    "kubernetes.api_url": "kubernetes.apiUrl",
    "kubernetes.ca": "chart: the cluster CA in the pod's projected kube-api-access volume",
    "kubernetes.token": "chart: the broker's own token in the pod's projected kube-api-access volume",
    "kubernetes.cache_ttl": "kubernetes.cacheTtl",
    "audit.to": "chart: stdout, beside the logs on stderr (the root filesystem is read-only)",
    "audit.fingerprint_key": "audit.fingerprintKeySecret",
    "account.name": "accounts.name",
    "account.api_key": "keysSecret.namePrefix",
    "account.api_secret": "keysSecret.namePrefix",
    "account.otp": "accounts.otp",
    "account.totp_secret": "accounts.otp",
    "account.key_expires_at": "accounts.keyExpiresAt",
    "account.forbid_permissions": "accounts.forbidPermissions",
    "consumer.name": "consumers.name",
    "consumer.credential_sha256": "consumers.credentialSha256",
    "consumer.kubernetes.namespace": "consumers.serviceAccount.namespace",
    "consumer.kubernetes.service_account": "consumers.serviceAccount.name",
    "consumer.client_cert.dns": "consumers.clientCert.dns",
    "consumer.client_cert.uri": "consumers.clientCert.uri",
    "consumer.client_cert.san": "chart: deprecated in the broker; the chart writes clientCertSan as dns or uri",
    "consumer.accounts": "consumers.accounts",
    "consumer.rate_limit.per_second": "consumers.rateLimit.perSecond",
    "consumer.rate_limit.burst": "consumers.rateLimit.burst",
    "consumer.relay.allow": "consumers.relay.allow",
    "consumer.relay.max_connections": "consumers.relay.maxConnections",
    "consumer.relay_only": "consumers.relayOnly",
}

# Keys whose value is the values key's, copied as it is.
COPIED = {
    "kraken.rest_url", "kraken.ws_url", "kraken.timeout", "kraken.max_rejected_calls", "kraken.key_info_interval",
    "refresh.refresh_before_expiry", "refresh.min_served_ttl", "refresh.jitter", "refresh.retry_initial",
    "refresh.retry_max", "refresh.retry_rejected", "kubernetes.audience", "kubernetes.api_url",
    "kubernetes.cache_ttl", "account.name", "account.key_expires_at", "account.forbid_permissions",
    "consumer.name", "consumer.kubernetes.namespace", "consumer.kubernetes.service_account",
    "consumer.client_cert.uri", "consumer.accounts", "consumer.rate_limit.per_second", "consumer.rate_limit.burst",
    "consumer.relay.allow", "consumer.relay.max_connections", "consumer.relay_only",
}

# Written by the broker's parser but never rendered by the chart, on purpose.
NOT_RENDERED = {"consumer.client_cert.san"}


def keys_of_parser() -> set[str]:
    """The config keys src/config/raw.rs accepts: each section the root is
    split into, and each field of its struct, nested sections followed."""
    text = (ROOT / "src" / "config" / "raw.rs").read_text()
    structs: dict[str, list[tuple[str, str]]] = {}
    for name, body in re.findall(r"pub\(super\) struct (\w+) \{(.*?)\n\}", text, re.S):
        structs[name] = re.findall(r"pub\(super\) (\w+): ([^\n]+),", body)
    fields_of_sections = dict(structs["Sections"])
    roots = re.findall(r'"(\w+)" => \{?\s*(?:sections\.has_\w+ = true;\s*)?sections\.(\w+) =', text)
    keys: set[str] = set()

    def walk(prefix: str, struct: str) -> None:
        for field, typ in structs[struct]:
            nested = re.search(r"(\w+Section)\b", typ)
            if nested:
                walk(f"{prefix}.{field}", nested.group(1))
            else:
                keys.add(f"{prefix}.{field}")

    for key, field in roots:
        section = re.search(r"(\w+Section)\b", fields_of_sections[field])
        assert section, f"raw.rs: the section {key} has no struct"
        walk(key, section.group(1))
    assert len(roots) >= 7 and len(keys) >= 30, f"raw.rs read wrongly: {roots} {sorted(keys)}"
    return keys


def keys_of_readme() -> set[str]:
    """The config keys README.md's configuration reference shows, commented
    ones and inline tables' keys included ({ file } / { env } are secret
    places, not keys of their own)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^### Configuration\n+```toml\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has a Configuration section with a toml block"
    keys: set[str] = set()
    table = ""
    for line in block.group(1).splitlines():
        line = re.sub(r"^#\s*(or:\s*)?", "", line.strip())
        header = re.match(r"^\[\[?([\w.]+)\]\]?", line)
        if header:
            table = header.group(1)
            continue
        entry = re.match(r"^(\w+)\s*=\s*(.*)$", line)
        if not entry:
            continue
        key, rest = entry.groups()
        inline = re.match(r"^\{([^}]*)\}", rest)
        inner = re.findall(r"(\w+)\s*=", inline.group(1)) if inline else []
        if inner and not set(inner) <= {"file", "env"}:
            keys.update(f"{table}.{key}.{k}" for k in inner)
        else:
            keys.add(f"{table}.{key}")
    assert len(keys) >= 25, f"README.md's reference read wrongly: {sorted(keys)}"
    return keys


def values_path_exists(schema: dict, path: str) -> bool:
    node = schema
    for part in path.split("."):
        while "items" in node and "properties" not in node:
            node = node["items"]
        props = node.get("properties", {})
        if part not in props:
            return False
        node = props[part]
    return True


def found(tree: Any, path: list[str]) -> list[Any]:
    """Every value at `path`, through lists (accounts, consumers)."""
    if isinstance(tree, list):
        return [v for item in tree for v in found(item, path)]
    if not path:
        return [tree]
    if not isinstance(tree, dict) or path[0] not in tree:
        return []
    return found(tree[path[0]], path[1:])


def check_config_keys(check, schema: dict, values: dict, broker_toml: str) -> None:
    """`check(condition, what)` is chart_checks' assertion. `values` rendered
    `broker_toml`; they should set every optional part."""
    keys = keys_of_parser() | keys_of_readme()
    missing = sorted(k for k in keys if k not in VALUES_OF)
    check(not missing, f"config keys with no values key (add one to the chart and to VALUES_OF): {missing}")
    config = tomllib.loads(broker_toml)
    # The top-level names used by the chart are [[account]] / [[consumer]].
    for key in sorted(keys):
        source = VALUES_OF[key]
        if not source.startswith("chart: "):
            check(values_path_exists(schema, source), f"{key}: values key {source} is in values.schema.json")
        if key in NOT_RENDERED:
            continue
        rendered = found(config, key.split("."))
        check(bool(rendered), f"{key} (from {source}) is rendered into broker.toml")
        if key in COPIED:
            given = found(values, source.split("."))
            check(bool(given), f"the check's values set {source}")
            for value in given:
                check(value in rendered, f"{key} is rendered from {source}: {value!r} not in {rendered!r}")
    print(f"every config key ({len(keys)}) has a values key and is rendered")
