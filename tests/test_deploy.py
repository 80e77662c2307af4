"""deploy/ checked offline: the Dockerfiles lint; the compose file fits the compose spec; the
Kustomize overlays render with kubectl and pass Kubernetes' schemas (kubernetes-validate,
strict); promtool accepts the Prometheus config and rules and their unit tests pass; every
PromQL expression names only metrics loramix (or vLLM, on the vLLM engine) exports; and a real
Prometheus scrapes a running loramix, evaluates the alert rules and answers every dashboard
query. The tools come from deploy/install-tools.sh; a missing one skips its tests, or fails
them when LORAMIX_REQUIRE_ALL=1 (CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from bench.nginx_router import POLICIES, ROUTER_DIR, NginxRouter, find_nginx
from bench.nginx_router import render as render_router
from server.composition import spec_from_model_string
from tests.optional_deps import missing
from tests.server_process import REPO_ROOT, ServerProcess, free_port

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
PROMETHEUS_DIR = COMPOSE / "prometheus"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "loramix.json"
OVERLAYS = ["cpu", "gpu", "inference-gateway"]
TOOLS_BIN = REPO_ROOT / ".cache" / "deploy-tools" / "bin"
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CUSTOM_KINDS = {"InferencePool", "HTTPRoute"}


def tool(name: str) -> str:
    """Path of a validation tool (deploy tools venv first, then PATH); skip or fail if absent."""
    path = shutil.which(name, path=str(TOOLS_BIN)) or shutil.which(name)
    if path:
        return path
    missing(f"{name} is not installed (bash deploy/install-tools.sh)")


def run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def check(*args: str, cwd: Path = REPO_ROOT) -> str:
    result = run(*args, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --- PromQL metric names --------------------------------------------------------------------

_GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "offset", "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names, labels, keywords dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(_GROUPING, "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def loramix_series_names() -> set[str]:
    """Every series name server/metrics.py exports (counters as *_total, histograms' parts)."""
    from prometheus_client.metrics import MetricWrapperBase

    import server.metrics

    names = set()
    for metric in vars(server.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def vllm_series_names() -> set[str]:
    """Metric names vLLM's Prometheus logger declares (read from its source, not imported)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        missing("vLLM is not installed: its metric names cannot be checked")
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    declared = set(re.findall(r'"(vllm:[a-z_]+)"', source))
    return {name + suffix for name in declared for suffix in ("", "_total", "_bucket", "_sum", "_count")}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def adapter_rules() -> list[dict]:
    return yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


def all_promql() -> list[tuple[str, str]]:
    adapter = [(rule["name"]["as"], rule["seriesQuery"]) for rule in adapter_rules()]
    return dashboard_targets() + alert_exprs() + adapter


def test_promql_metric_names_extractor():
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(loramix_merge_seconds_bucket'
            '{job=~"$job", method!="cat"}[$__rate_interval]))) / on (job) vllm:num_requests_waiting > 2')
    assert promql_metric_names(expr) == {"loramix_merge_seconds_bucket", "vllm:num_requests_waiting"}
    assert promql_metric_names('up{job="loramix"} == 0 and sum without (tier) (x_total)') == {"up", "x_total"}


def test_every_promql_expression_names_exported_metrics():
    exported = loramix_series_names()
    assert "loramix_requests_total" in exported and "loramix_merge_seconds_bucket" in exported
    for where, expr in all_promql():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = {n for n in names if n not in exported and not n.startswith("vllm:") and n != "up"}
        assert not unknown, f"{where}: {sorted(unknown)} are not exported by loramix (server/metrics.py)"


def test_vllm_metric_names_exist_in_vllm():
    declared = vllm_series_names()
    used = {n for _, expr in all_promql() for n in promql_metric_names(expr) if n.startswith("vllm:")}
    epp = yaml.safe_load_all((DEPLOY / "k8s" / "overlays" / "inference-gateway" / "epp.yaml").read_text())
    for doc in epp:
        if doc["kind"] == "Deployment":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            used |= {arg.split("=", 1)[1] for arg in args if arg.split("=")[0].endswith("-metric")}
    assert {"vllm:num_requests_waiting", "vllm:lora_requests_info"} <= used
    assert used <= declared, f"not declared by vLLM: {sorted(used - declared)}"


# --- Docker -----------------------------------------------------------------------------------

DOCKERFILES = ["cpu.Dockerfile", "gpu.Dockerfile"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints(name):
    check(tool("hadolint"), str(DEPLOY / "docker" / name))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_versioned_non_root_and_health_checked(name):
    text = (DEPLOY / "docker" / name).read_text()
    instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    keywords = [kw.upper() for kw, *_ in instructions]
    base = next(rest for kw, rest in instructions if kw.upper() == "FROM")
    assert "${" in base, f"base image version must be a build ARG: FROM {base}"
    user = [rest for kw, rest in instructions if kw.upper() == "USER"]
    assert user and user[-1].strip() not in ("root", "0"), "the image must run as a non-root user"
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    assert any(kw.upper() == "HEALTHCHECK" and "/health" in rest for kw, rest in instructions)
    volumes = " ".join(rest for kw, rest in instructions if kw.upper() == "VOLUME")
    assert "/skills" in volumes and "/cache" in volumes
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {src for kw, rest in instructions if kw.upper() == "COPY" for src in rest.split()[:-1]}
    assert {pkg.rstrip("*") for pkg in packages} <= copied, "every installed package must be copied"
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text()
    assert all(f"!{src}" in ignore or f"!{src}/" in ignore for src in copied), "the .dockerignore drops a COPY source"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


# --- Compose and Grafana ----------------------------------------------------------------------

def test_compose_files_fit_the_compose_spec():
    files = [str(COMPOSE / "docker-compose.yml"), str(COMPOSE / "docker-compose.gpu.yml")]
    check(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files)


def test_compose_paths_exist_and_grafana_points_at_the_provisioned_datasource():
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        compose = yaml.safe_load((COMPOSE / name).read_text())
        for service in compose["services"].values():
            if "build" in service:
                assert (COMPOSE / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (COMPOSE / source).is_dir(), source
    datasources = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {ds["uid"] for ds in datasources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert all(t["datasource"]["uid"] in uids for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("status", "first token", "inter-token", "tokens/s", "running", "cache", "merge", "adapters"):
        assert topic in titles, f"dashboard has no {topic} panel"


# --- Prometheus config and rules --------------------------------------------------------------

def test_promtool_accepts_config_and_rules():
    promtool = tool("promtool")
    check(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    check(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)


def test_alert_rules_unit_tests_pass():
    check(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS_DIR)


# --- Kubernetes -------------------------------------------------------------------------------

def render(overlay: str) -> list[dict]:
    text = check(tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def validate(docs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return run(tool("kubernetes-validate"), "--strict", str(path))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def server_deployment(docs: list[dict]) -> dict:
    return next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "loramix")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_kubernetes_schemas(overlay, tmp_path):
    docs = render(overlay)
    result = validate(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr))
    assert unchecked <= CUSTOM_KINDS, f"kinds without a schema: {unchecked - CUSTOM_KINDS}"


def test_schema_validation_rejects_a_misspelt_field(tmp_path):
    docs = render("cpu")
    server_deployment(docs)["spec"]["replica"] = 2
    assert validate(docs, tmp_path).returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_wiring(overlay):
    docs = render(overlay)
    deployment = server_deployment(docs)
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    claims = {c["metadata"]["name"] for c in by_kind(docs, "PersistentVolumeClaim")}
    used = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert {"loramix-skills", "loramix-cache"} <= used <= claims
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "loramix")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    config_name = container["envFrom"][0]["configMapRef"]["name"]
    config = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == config_name)["data"]
    from server.settings import Settings

    unknown = {k for k in config if k.startswith("LORAMIX_")} - {f"LORAMIX_{f.upper()}" for f in Settings.model_fields}
    assert not unknown, f"not loramix settings: {unknown}"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    adapter_metrics = {rule["name"]["as"] for rule in adapter_rules()}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= adapter_metrics
    if overlay != "cpu":
        tensor_parallel = [a for a in container["args"] if a.startswith("--tensor-parallel-size=")]
        assert config["LORAMIX_ENGINE"] == "vllm"
        assert tensor_parallel and container["resources"]["limits"]["nvidia.com/gpu"] == tensor_parallel[0].split("=")[1]


def test_inference_pool_selects_the_server_pods_and_its_endpoint_picker():
    docs = render("inference-gateway")
    pod = server_deployment(docs)["spec"]["template"]
    (pool,) = by_kind(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in spec["targetPorts"]] == [8000] and 8000 in ports
    picker = spec["endpointPickerRef"]
    epp_service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == picker["name"])
    assert picker["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    epp = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] != "loramix")
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert f"--pool-name={pool['metadata']['name']}" in epp["spec"]["template"]["spec"]["containers"][0]["args"]
    (route,) = by_kind(docs, "HTTPRoute")
    backends = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}]
    config_map = next(c for c in by_kind(docs, "ConfigMap") if "epp-config.yaml" in c.get("data", {}))
    epp_config = yaml.safe_load(config_map["data"]["epp-config.yaml"])
    declared = {p["type"] for p in epp_config["plugins"]}
    referenced = {ref["pluginRef"] for profile in epp_config["schedulingProfiles"] for ref in profile["plugins"]}
    assert "lora-affinity-scorer" in referenced and referenced <= declared


# --- A real Prometheus scraping a real loramix ------------------------------------------------

class Prometheus:
    """The prometheus binary on a free loopback port, with a config and storage in tmp_path."""

    def __init__(self, binary: str, config: Path, storage: Path, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, limit_s: float = 60) -> None:
        """Until /-/ready answers 200 (before that the API answers 503 in plain text)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("prometheus exited early")
            try:
                if httpx.get(self.url + "/-/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready within {limit_s}s")

    def get(self, path: str, **params) -> dict:
        reply = httpx.get(self.url + path, params=params, timeout=10).json()
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_for(self, expr: str, limit_s: float = 60) -> list[dict]:
        """Poll until `expr` has a result (a scrape or rule evaluation that saw it)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("prometheus exited early")
            try:
                if result := self.query(expr):
                    return result
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"no result for {expr!r} within {limit_s}s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def scraped(tiny_base, skills_dir, tmp_path_factory):
    """A loramix server (local engine, tiny model) scraped every second by Prometheus running
    the shipped scrape job and alert rules; traffic is sent once scraping has started."""
    binary = tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    server = ServerProcess(root / "server.log", base_model=tiny_base, skills_dir=skills_dir,
                           served_model_name="tiny", cache_dir=root / "cache", max_lora_rank=16,
                           engine="local")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "loramix"]
    job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    config["scrape_configs"] = [job]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = Prometheus(binary, root / "prometheus.yml", root / "data", root / "prometheus.log")
    try:
        prometheus.wait_ready()
        prometheus.wait_for('up{job="loramix"} == 1')
        models = ["tiny", "math", "math+code", "math+code"]
        for model in models:
            reply = httpx.post(server.url + "/v1/completions", timeout=60,
                               json={"model": model, "prompt": "1 + 1 =", "max_tokens": 4, "temperature": 0})
            assert reply.status_code == 200, reply.text
        assert httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": "nosuch", "prompt": "x", "max_tokens": 1}).status_code == 404
        prometheus.wait_for(f'sum(loramix_requests_total{{endpoint="/v1/completions"}}) >= {len(models) + 1}')
        time.sleep(3)  # a few more samples, so 1m rates see the traffic
        yield server, prometheus
    finally:
        prometheus.stop()
        server.stop()


def test_prometheus_scrapes_loramix_and_counts_its_requests(scraped):
    server, prometheus = scraped
    ok = prometheus.query('sum(loramix_requests_total{job="loramix", endpoint="/v1/completions", status="200"})')
    assert float(ok[0]["value"][1]) == server.metric("loramix_requests_total", endpoint="/v1/completions", status="200") == 4
    (not_found,) = prometheus.query('loramix_errors_total{code="model_not_found"}')
    assert float(not_found["value"][1]) == 1
    merges = prometheus.query('sum(loramix_merges_total{method="cat"})')
    assert float(merges[0]["value"][1]) >= 1  # math+code was merged (the second time, a cache hit)
    (ttft,) = prometheus.query(
        "histogram_quantile(0.99, sum by (le) (rate(loramix_time_to_first_token_seconds_bucket[1m])))")
    assert 0 < float(ttft["value"][1]) <= 30


def test_prometheus_evaluates_every_alert_rule(scraped):
    _, prometheus = scraped
    deadline = time.monotonic() + 30
    while True:
        rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        if all(r.get("lastEvaluation", "").startswith("20") and r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {name for name, _ in alert_exprs()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing, f"alerts firing on a healthy server: {firing}"


def test_every_dashboard_query_runs_and_loramix_panels_have_data(scraped):
    server, prometheus = scraped
    present = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", server.metrics(), re.M))
    for title, expr in dashboard_targets():
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", "loramix")
        result = prometheus.query(concrete)  # a PromQL error fails here
        names = promql_metric_names(expr)
        if names <= present:
            assert result, f"{title}: no data for {concrete}"
            values = [float(r["value"][1]) for r in result]
            assert not any(math.isinf(v) for v in values), f"{title}: {values}"


# --- Composition routing: the real nginx (njs, deploy/router/) in front of real replicas ------

def nginx_or_missing() -> tuple[str, Path]:
    found = find_nginx()
    if found is None:
        missing("nginx with the njs module is not installed (bash deploy/install-tools.sh)")
    return found


def test_shipped_router_config_passes_nginx_t(tmp_path):
    """deploy/router/nginx.conf as shipped (only load_module pointed at the njs module found
    here), with composition.js beside it; and both rendered policies."""
    binary, module = nginx_or_missing()
    shipped = (ROUTER_DIR / "nginx.conf").read_text()
    assert "hash $composition consistent;" in shipped and "js_set $composition composition.key;" in shipped
    configs = {
        "shipped": re.sub(r"load_module \S+;", f"load_module {module};", shipped),
        **{policy: render_router(["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3", policy, module) for policy in POLICIES},
    }
    assert "hash $composition" not in configs["round_robin"]
    for name, text in configs.items():
        conf_dir = tmp_path / name
        conf_dir.mkdir()
        shutil.copy(ROUTER_DIR / "composition.js", conf_dir)
        (conf_dir / "nginx.conf").write_text(text)
        check(binary, "-t", "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf"), "-e", "stderr")
    (tmp_path / "shipped" / "composition.js").write_text("export default {key: };\n")  # njs compiles it
    assert run(binary, "-t", "-p", str(tmp_path / "shipped"), "-c", str(tmp_path / "shipped" / "nginx.conf"),
               "-e", "stderr").returncode != 0


@pytest.fixture(scope="module")
def routed(tiny_base, skills_dir, tmp_path_factory):
    """Two loramix replicas (tiny model, local engine, caches of their own) behind nginx
    routing by composition with the shipped config."""
    nginx_or_missing()
    root = tmp_path_factory.mktemp("routed")

    def replica(index: int) -> ServerProcess:
        return ServerProcess(root / f"replica{index}.log", base_model=tiny_base, skills_dir=skills_dir,
                             served_model_name="tiny", cache_dir=root / f"cache{index}", engine="local")

    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(replica, index) for index in range(2)]
    replicas = [future.result() for future in starting if future.exception() is None]
    router = None
    try:
        if len(replicas) < 2:
            raise next(future.exception() for future in starting if future.exception() is not None)
        router = NginxRouter([r.url.removeprefix("http://") for r in replicas], "consistent_hash", root / "nginx")
        yield router, {r.url.removeprefix("http://"): r for r in replicas}
    finally:
        if router is not None:
            router.stop()
        for r in replicas:
            r.stop()


def _post(router: NginxRouter, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(router.url + "/v1/completions", content=body, timeout=120,
                          headers={"Content-Type": "application/json"})
    return httpx.post(router.url + "/v1/completions", json=body, timeout=120)


def test_the_same_composition_always_lands_on_the_same_replica(routed):
    router, replicas = routed
    completions = {name: replica.metric("loramix_requests_total", endpoint="/v1/completions")
                   for name, replica in replicas.items()}
    # Unknown skills are routed like any composition and answered quickly (404) without a merge.
    models = ["tiny", "math", "math+code", "code+poetry@svd"] + [f"nosuch{i}+math" for i in range(20)]
    landed: dict[str, set[str]] = {}
    counts = {name: 0 for name in replicas}
    for _ in range(3):
        for model in models:
            reply = _post(router, {"model": model, "prompt": "1 + 1 =", "max_tokens": 2, "temperature": 0})
            assert reply.status_code == (404 if model.startswith("nosuch") else 200), reply.text
            upstream = reply.headers["x-loramix-upstream"]
            landed.setdefault(model, set()).add(upstream)
            counts[upstream] += 1
    assert all(len(upstreams) == 1 for upstreams in landed.values()), landed
    assert set().union(*landed.values()) == set(replicas), "24 keys all hashed to one replica"
    for name, replica in replicas.items():  # the header names the replica that really answered
        assert replica.metric("loramix_requests_total", endpoint="/v1/completions") - completions[name] == counts[name]
    # Requested three times, merged once in the whole fleet (round robin would merge it twice).
    assert sum(r.metric("loramix_merges_total", method="svd") for r in replicas.values()) == 1


def test_a_structured_composition_is_routed_by_its_content(routed):
    router, _ = routed
    bodies = [{"model": "tiny", "prompt": "x", "max_tokens": 1, "composition": composition}
              for composition in ({"skills": {"math": 0.5, "code": 0.5}, "method": "cat"},
                                  {"method": "cat", "skills": {"code": 0.5, "math": 0.5}})]
    upstreams = set()
    for body in bodies * 2:
        reply = _post(router, body)
        assert reply.status_code == 200, reply.text
        upstreams.add(reply.headers["x-loramix-upstream"])
    assert len(upstreams) == 1


def test_a_body_without_model_is_balanced_round_robin_and_answered_by_loramix(routed):
    router, replicas = routed
    upstreams = set()
    for body in [{"prompt": "x"}, b"not json", {"prompt": "x", "model": 7}, [1, 2]] * 2:
        reply = _post(router, body)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
        upstreams.add(reply.headers["x-loramix-upstream"])
    assert upstreams == set(replicas)  # the empty key: nginx's round robin fallback


def test_engine_adapter_name_is_the_canonical_composition_string(routed):
    """vllm:lora_requests_info lists a running composition by its canonical model string, the
    `model` a client sends for the Inference Gateway's LoRA-affinity scorer to match."""
    router, replicas = routed
    canonical = "code*0.5+math*0.5@cat"
    assert spec_from_model_string("math+code", default_method="cat").model_string() == canonical
    body = {"model": canonical, "prompt": "1 + 1 =", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        replica = replicas[response.headers["x-loramix-upstream"]]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        info = [line for line in replica.metrics().splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and f'running_lora_adapters="{canonical}"' in info[0], info
