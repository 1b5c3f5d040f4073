#!/usr/bin/env bash
# The container's entrypoint (SageMaker runs `docker run <image> serve`): TF Serving behind
# nginx. Either process dying stops the other and the container; SIGTERM stops both.
# `make serve` runs this same script with the local TF Serving stand-in as TFS_BIN.
set -euo pipefail

MODEL_NAME="${MODEL_NAME:-pet_object_detection}"
MODEL_BASE_PATH="${MODEL_BASE_PATH:-/models}"  # holds ${MODEL_NAME}/<version>/saved_model.pb
# SageMaker sends /ping and /invocations to 8080, or to the port it names (accept-bind-to-port).
NGINX_LISTEN="${NGINX_LISTEN:-${SAGEMAKER_BIND_TO_PORT:-8080}}"
TFS_REST_PORT="${TFS_REST_PORT:-8501}"
TFS_GRPC_PORT="${TFS_GRPC_PORT:-8500}"
TFS_BIN="${TFS_BIN:-tensorflow_model_server}"  # a command line: the stand-in is `python -m detkit.serve.tfserving`
NGINX_BIN="${NGINX_BIN:-nginx}"
SERVING_DIR="${SERVING_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
# TF Serving's request batching. With a timeout of 0 a lone request never waits for company,
# while requests that arrive as the batch threads are busy share the next batch, which raises
# throughput under concurrent load (make bench). A request with more instances than
# TFS_MAX_BATCH_SIZE is refused (400), so that is set well above a client's usual batch.
TFS_ENABLE_BATCHING="${TFS_ENABLE_BATCHING:-true}"
TFS_MAX_BATCH_SIZE="${TFS_MAX_BATCH_SIZE:-32}"
TFS_BATCH_TIMEOUT_MICROS="${TFS_BATCH_TIMEOUT_MICROS:-0}"
TFS_NUM_BATCH_THREADS="${TFS_NUM_BATCH_THREADS:-$(nproc)}"
TFS_MAX_ENQUEUED_BATCHES="${TFS_MAX_ENQUEUED_BATCHES:-100}"
# nginx gives TF Serving INVOCATION_TIMEOUT_S for an answer (SageMaker's 60 s per invocation); TF
# Serving's deadline for a request is shorter, so that it stops the request's work itself (a queued
# request is dropped, a running one cancelled between two ops) and answers before nginx gives up.
INVOCATION_TIMEOUT_S="${INVOCATION_TIMEOUT_S:-60}"
TFS_REST_API_TIMEOUT_MS="${TFS_REST_API_TIMEOUT_MS:-$(( (INVOCATION_TIMEOUT_S - 10) * 1000 ))}"
CLIENT_TIMEOUT_S="${CLIENT_TIMEOUT_S:-60}"  # nginx's wait for a client's request line, headers and body

if [[ "${1:-serve}" != "serve" ]]; then
  exec "$@"  # e.g. `docker run <image> bash`
fi

if [[ ! "$TFS_REST_API_TIMEOUT_MS" =~ ^[1-9][0-9]*$ ]] || (( TFS_REST_API_TIMEOUT_MS >= INVOCATION_TIMEOUT_S * 1000 )); then
  echo "entrypoint: TFS_REST_API_TIMEOUT_MS='$TFS_REST_API_TIMEOUT_MS' must be a positive number of milliseconds" \
    "under INVOCATION_TIMEOUT_S=$INVOCATION_TIMEOUT_S s: TF Serving must give up on a request before nginx does" >&2
  exit 2
fi
NGINX_RUNTIME_DIR="$(mktemp -d "${TMPDIR:-/tmp}/serving.XXXXXX")"
export MODEL_NAME NGINX_LISTEN TFS_REST_PORT TFS_NUM_BATCH_THREADS INVOCATION_TIMEOUT_S CLIENT_TIMEOUT_S
"$SERVING_DIR/render-nginx-conf.sh" "$NGINX_RUNTIME_DIR"

batching=()
if [[ "$TFS_ENABLE_BATCHING" == "true" ]]; then
  cat > "$NGINX_RUNTIME_DIR/batching.config" <<CONFIG
max_batch_size { value: $TFS_MAX_BATCH_SIZE }
batch_timeout_micros { value: $TFS_BATCH_TIMEOUT_MICROS }
num_batch_threads { value: $TFS_NUM_BATCH_THREADS }
max_enqueued_batches { value: $TFS_MAX_ENQUEUED_BATCHES }
CONFIG
  batching=(--enable_batching=true "--batching_parameters_file=$NGINX_RUNTIME_DIR/batching.config")
fi

read -r -a tfs_command <<< "$TFS_BIN"
"${tfs_command[@]}" --port="$TFS_GRPC_PORT" --rest_api_port="$TFS_REST_PORT" --model_name="$MODEL_NAME" \
  --model_base_path="$MODEL_BASE_PATH/$MODEL_NAME" --rest_api_timeout_in_ms="$TFS_REST_API_TIMEOUT_MS" "${batching[@]}" &
tfs_pid=$!
"$NGINX_BIN" -e stderr -c "$NGINX_RUNTIME_DIR/nginx.conf" &
nginx_pid=$!
echo "entrypoint: TF Serving (pid $tfs_pid, REST port $TFS_REST_PORT) behind nginx (pid $nginx_pid, $NGINX_LISTEN)," \
  "model $MODEL_NAME from $MODEL_BASE_PATH/$MODEL_NAME"

stopping=0
stop() {
  stopping=1
  kill -TERM "$tfs_pid" "$nginx_pid" 2>/dev/null || true
}
trap stop TERM INT

status=0
wait -n "$tfs_pid" "$nginx_pid" || status=$?
asked_to_stop=$stopping
if [[ "$asked_to_stop" == "0" ]]; then
  echo "entrypoint: a server exited (status $status): stopping the other" >&2
fi
stop
wait "$tfs_pid" "$nginx_pid" 2>/dev/null || true
rm -rf "$NGINX_RUNTIME_DIR"
if [[ "$asked_to_stop" == "1" ]]; then status=0; fi  # a requested stop is a clean exit
exit "$status"
