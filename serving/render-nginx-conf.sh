#!/usr/bin/env bash
# Render nginx.conf.template into RUNTIME_DIR/nginx.conf, with nginx's temp folders there.
# Usage: render-nginx-conf.sh RUNTIME_DIR   (reads MODEL_NAME, NGINX_LISTEN, TFS_REST_PORT, TFS_NUM_BATCH_THREADS,
# INVOCATION_TIMEOUT_S, CLIENT_TIMEOUT_S)
# The entrypoint calls it; `nginx -t -c RUNTIME_DIR/nginx.conf` checks the result.
set -euo pipefail

NGINX_RUNTIME_DIR="$1"
SERVING_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${MODEL_NAME:?}" "${NGINX_LISTEN:?}" "${TFS_REST_PORT:?}" "${TFS_NUM_BATCH_THREADS:?}"
: "${INVOCATION_TIMEOUT_S:?}" "${CLIENT_TIMEOUT_S:?}"
# They land in JSON bodies (/execution-parameters, error pages): anything but a count would break them.
for name in TFS_NUM_BATCH_THREADS INVOCATION_TIMEOUT_S CLIENT_TIMEOUT_S; do
  if [[ ! "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "render-nginx-conf.sh: $name='${!name}': expected a positive integer" >&2
    exit 2
  fi
done
# nginx started by root drops its workers to `nobody`, who could not use root's folders.
NGINX_USER_LINE=""
if [[ "$(id -u)" == "0" ]]; then NGINX_USER_LINE="user root;"; fi
export MODEL_NAME NGINX_LISTEN TFS_REST_PORT NGINX_RUNTIME_DIR NGINX_USER_LINE SERVING_DIR TFS_NUM_BATCH_THREADS \
  INVOCATION_TIMEOUT_S CLIENT_TIMEOUT_S
mkdir -p "$NGINX_RUNTIME_DIR"
chmod 755 "$NGINX_RUNTIME_DIR"
# shellcheck disable=SC2016  # the list names the variables envsubst may replace, unexpanded
envsubst '${NGINX_LISTEN} ${TFS_REST_PORT} ${MODEL_NAME} ${NGINX_RUNTIME_DIR} ${NGINX_USER_LINE} ${SERVING_DIR}
  ${TFS_NUM_BATCH_THREADS} ${INVOCATION_TIMEOUT_S} ${CLIENT_TIMEOUT_S}' \
  < "$SERVING_DIR/nginx.conf.template" > "$NGINX_RUNTIME_DIR/nginx.conf"
