"""Deployment files (Dockerfile, deploy/): structure, cross-file consistency and linters.

Nothing is built or run: there is no Docker engine or cluster in CI. The linters run through
subprocess when their binaries are installed (``scripts/lint_deploy.sh`` lists them) and are
skipped, with the reason, when not. CPU only, a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read deploy/ (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_DIRS = {"single": K8S, "tp4": K8S / "tp4"}
ENTRYPOINT = DEPLOY / "entrypoint.sh"
THRIFT_ENV = ("THRIFT_MODEL", "THRIFT_FP16_BUDGET", "THRIFT_MAX_FP16_BUDGET", "PORT")
K8S_VERSION = "1.30.0"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def docker_env() -> dict[str, str]:
    env = {}
    for args in instr("ENV"):
        for m in re.finditer(r'(\w+)=("[^"]*"|\S*)', args):
            env[m.group(1)] = m.group(2).strip('"')
    return env


def exposed_port() -> int:
    (args,) = instr("EXPOSE")
    return int(args.split("/")[0])


def image_uid() -> int:
    (user,) = instr("USER")
    return int(user.split(":")[0])


def test_dockerfile_base_is_pinned_vllm_cuda_image():
    (base,) = instr("FROM")
    assert base == "vllm/vllm-openai:v0.33.0", base
    text = (ROOT / "Dockerfile").read_text()
    # The comment the version choice rests on.
    assert "0.32" in text and "compat" in text and "0.26" in text


def test_dockerfile_installs_project_without_deps_swap_or_foreign_packages():
    runs = " ".join(instr("RUN"))
    assert re.search(r"pip install --no-cache-dir( --no-deps)? \.(/src)?(\s|$)", runs), runs
    # Never a top-level package named `kernels` or `server` (HF's `kernels`, ...).
    for word in re.findall(r"pip install ([^&;]*)", runs):
        assert not re.search(r"(^|\s)(kernels|server)(\s|$|[=<>\[])", word), word
    copies = " ".join(instr("COPY"))
    for src in ("pyproject.toml", "README.md", "thrift_vllm/", "kernels/", "server/"):
        assert f" {src} " in f" {copies} ", f"the image does not copy {src}"
    # The wheel's own top-level check (no `kernels` / `server` package) runs in the build.
    assert "top_level.txt" in runs


def test_dockerfile_entrypoint_runs_thrift_vllm_serve():
    (entry,) = instr("ENTRYPOINT")
    argv = json.loads(entry)  # exec form
    if argv[:2] != ["thrift-vllm", "serve"]:
        # The wrapper that maps THRIFT_* / PORT to flags: it must be the copied deploy script
        # and must exec `thrift-vllm serve`.
        script = argv[0]
        assert any(c.split()[-2:] == ["deploy/entrypoint.sh", script]
                   for c in (re.sub(r"--\S+", "", c).strip() for c in instr("COPY"))), script
        assert re.search(r'^exec thrift-vllm serve "\$@"$', ENTRYPOINT.read_text(), re.M)
    cmd = instr("CMD")
    assert cmd == [] or json.loads(cmd[-1]) == [] or "thrift-vllm" not in cmd[-1]


def test_dockerfile_user_port_health_labels_env():
    uid = image_uid()
    assert uid != 0, "the image must run as a non-root user"
    env = docker_env()
    for key in THRIFT_ENV:
        assert key in env, f"Dockerfile ENV lacks {key}"
    assert int(env["PORT"]) == exposed_port()
    (health,) = instr("HEALTHCHECK")
    assert "/health" in health and "--start-period" in health
    labels = " ".join(instr("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_context_small_but_complete():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for excluded in (".git", "runs/", "models/", "**/__pycache__", "**/.pytest_cache"):
        assert excluded in lines, excluded
    if lines[0] == "*":  # allow-list: every COPY source must be re-included
        allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
        for args in instr("COPY"):
            for src in [a for a in args.split() if not a.startswith("--")][:-1]:
                if "*" not in src:  # globs (models*) are optional sources
                    assert src.rstrip("/") in allowed, f"COPY {src} but .dockerignore drops it"


def test_image_embedded_model_location_matches_server():
    """The image bakes the default model where thrift_vllm.server.models looks for it."""
    models_py = ROOT / "server" / "models.py"
    if not models_py.exists():
        pytest.skip("server/models.py does not exist yet (server milestone)")
    src = models_py.read_text()
    assert "THRIFT_VLLM_MODELS_DIR" in src
    trained = re.search(r'^TRAINED_NAME = "([^"]+)"', src, re.M).group(1)
    models_dir = docker_env()["THRIFT_VLLM_MODELS_DIR"]
    assert any(c.split()[-1].rstrip("/") == models_dir for c in instr("COPY") if "models*" in c)
    assert "default_model()" in " ".join(instr("RUN"))
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert f"!models/{trained}/" in ignore and ignore.index(f"!models/{trained}/") > \
        ignore.index("models/"), "the trained embedded model must be re-included after models/"


# ---------------------------------------------------------------------------------------------
# deploy/entrypoint.sh, run with a fake `thrift-vllm` that prints its argv


@pytest.fixture()
def fake_bin(tmp_path):
    fake = tmp_path / "thrift-vllm"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    return tmp_path


def run_entrypoint(fake_bin, env, *args):
    full = {"PATH": f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin", **env}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=full, capture_output=True,
                          text=True, timeout=10)


def test_entrypoint_maps_environment_to_serve_flags(fake_bin):
    r = run_entrypoint(fake_bin, {"THRIFT_MODEL": "org/m", "THRIFT_FP16_BUDGET": "0.1",
                                  "THRIFT_MAX_FP16_BUDGET": "0.5", "PORT": "9001",
                                  "THRIFT_KV_LAYOUT": "nvfp4"},
                       "--tensor-parallel-size", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "serve", "org/m", "--host", "0.0.0.0", "--port", "9001", "--fp16-budget", "0.1",
        "--kv-layout", "nvfp4", "--max-fp16-budget", "0.5", "--tensor-parallel-size", "4"]


def test_entrypoint_defaults_and_commands(fake_bin):
    # No THRIFT_MODEL: no MODEL argument, so the server serves the embedded model.
    r = run_entrypoint(fake_bin, {"THRIFT_MODEL": "", "THRIFT_FP16_BUDGET": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    r = run_entrypoint(fake_bin, {}, "echo", "ray")  # a non-flag first argument is a command
    assert r.returncode == 0 and r.stdout.strip() == "ray"


def test_serve_cli_knows_the_flags_the_entrypoint_passes():
    """Contract with the server milestone (thrift_vllm.server.cli), checked on its source."""
    cli = ROOT / "server" / "cli.py"  # installed as thrift_vllm.server.cli
    if not cli.exists():
        pytest.skip("server/cli.py does not exist yet (server milestone)")
    source = cli.read_text()
    for flag in ("--fp16-budget", "--max-fp16-budget"):
        assert flag in source, f"deploy/entrypoint.sh passes {flag}; the serve CLI lacks it"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^thrift-vllm\s*=\s*"thrift_vllm\.server\.cli:main"', pyproject, re.M)


def deploy_serve_argvs(fake_bin) -> dict[str, list[str]]:
    """The `thrift-vllm serve` arguments each deployment produces, through the entry point."""
    out = {}
    svc = next(iter(compose()["services"].values()))
    env = {k: ("" if v is None else str(v)) for k, v in svc["environment"].items()}
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
    out["compose"] = (env, svc.get("command") or [])
    for variant, folder in K8S_DIRS.items():
        docs = k8s_docs(folder)
        (ctr,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
        out[f"k8s-{variant}"] = (docs["ConfigMap"]["data"], ctr.get("args") or [])
    out["multinode"] = ({"THRIFT_MODEL": "org/m"}, [
        "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
        "--distributed-executor-backend", "ray"])
    argvs = {}
    for name, (env, args) in out.items():
        r = run_entrypoint(fake_bin, env, *args)
        assert r.returncode == 0, (name, r.stderr)
        argv = r.stdout.splitlines()
        assert argv[0] == "serve", (name, argv)
        argvs[name] = argv[1:]
    return argvs


@pytest.mark.slow
def test_serve_parser_accepts_every_deploy_argv(fake_bin):
    """The real `thrift-vllm serve` parser (vLLM's plus the thrift flags) takes what the
    entry point builds for compose, both k8s variants and the multi-node guide (~15 s: vLLM)."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    try:
        from thrift_vllm.server.cli import build_parser
    except ImportError as e:
        pytest.skip(f"thrift_vllm.server.cli not importable: {e}")
    parser = build_parser()
    for name, argv in deploy_serve_argvs(fake_bin).items():
        args = parser.parse_args(argv)
        assert args.port == 8000 and args.host == "0.0.0.0", name
        if name != "multinode":  # the deployments set both budget settings
            assert args.fp16_budget == 0.05 and args.max_fp16_budget == 0.25, name


# ---------------------------------------------------------------------------------------------
# docker-compose


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_service_gpu_env_port_health_volume():
    services = compose()["services"]
    assert len(services) == 1
    (svc,) = services.values()
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia" and dev["count"] == 1
    for key in THRIFT_ENV:
        assert key in svc["environment"], key
    port = int(svc["environment"]["PORT"])
    assert port == exposed_port()
    assert all(str(p).rsplit(":", 1)[-1] == str(port) for p in svc["ports"])
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["build"]["context"] == ".." and svc["build"]["dockerfile"] == "Dockerfile"
    mounts = dict(v.split(":")[::-1][:2] for v in svc["volumes"])
    assert mounts["/data"] in compose()["volumes"]
    assert docker_env()["HF_HOME"].startswith("/data/")


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s_docs(folder: Path) -> dict[str, dict]:
    docs = {}
    for f in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} in {folder}"
                docs[doc["kind"]] = doc
    return docs


API = {"Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1"}


@pytest.mark.parametrize("variant", sorted(K8S_DIRS))
def test_k8s_manifests_consistent(variant):
    docs = k8s_docs(K8S_DIRS[variant])
    assert set(docs) == set(API)
    for kind, api in API.items():
        assert docs[kind]["apiVersion"] == api
    dep, svc, cm = docs["Deployment"], docs["Service"], docs["ConfigMap"]
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    gpus = 1 if variant == "single" else 4

    # GPUs: requested and limited alike (extended resources cannot be overcommitted).
    res = ctr["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus
    assert "cpu" in res["requests"] and "memory" in res["requests"]
    if gpus > 1:
        args = ctr["args"]
        assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)
    vols = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in ctr["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and vols[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"

    # Non-root, matching the image's numeric USER.
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == image_uid() != 0
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["enableServiceLinks"] is False  # THRIFT_VLLM_* service-link variables

    # Env from this variant's ConfigMap, holding every THRIFT_* setting.
    assert [e["configMapRef"]["name"] for e in ctr["envFrom"]] == [cm["metadata"]["name"]]
    for key in THRIFT_ENV:
        assert isinstance(cm["data"][key], str) and cm["data"][key], key
    port = int(cm["data"]["PORT"])

    # Ports: ConfigMap PORT == containerPort == Dockerfile EXPOSE == Service targetPort.
    named = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert port == exposed_port() and port in named.values()
    for sp in svc["spec"]["ports"]:
        target = sp["targetPort"]
        assert named.get(target, target) == port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()

    # Probes on /health, on the serving port, with room for model load.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = ctr[probe]["httpGet"]
        assert get["path"] == "/health" and named.get(get["port"], get["port"]) == port
    assert ctr["readinessProbe"]["initialDelaySeconds"] >= 30
    assert ctr["livenessProbe"]["initialDelaySeconds"] >= 120
    start = ctr["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 600  # >= 10 min to load


def test_multinode_guide_uses_vllm_ray_runtime():
    text = (DEPLOY / "MULTINODE.md").read_text()
    for needle in ("ray start --head", "--address=", "--tensor-parallel-size",
                   "--pipeline-parallel-size", "--distributed-executor-backend ray",
                   "every node", "Not run here"):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------------
# Linters (skipped when not installed; scripts/lint_deploy.sh requires them all)


def run_tool(*argv: str) -> None:
    exe = shutil.which(argv[0])
    if exe is None:
        pytest.skip(f"{argv[0]} not installed (see scripts/lint_deploy.sh for the pip package)")
    r = subprocess.run([exe, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(argv)}:\n{r.stdout}\n{r.stderr}"


def test_hadolint():
    run_tool("hadolint", "Dockerfile")


def test_shellcheck():
    run_tool("shellcheck", "deploy/entrypoint.sh", "scripts/lint_deploy.sh")


def test_yamllint():
    run_tool("yamllint", "--strict", "-c", "deploy/.yamllint.yaml", "deploy/")


def test_compose_schema():
    run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec",
             "deploy/docker-compose.yml")


def test_k8s_schema():
    files = [str(p.relative_to(ROOT)) for d in K8S_DIRS.values() for p in sorted(d.glob("*.yaml"))]
    run_tool("kubernetes-validate", "--strict", "--quiet", "--kubernetes-version", K8S_VERSION,
             *files)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
