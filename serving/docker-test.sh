#!/usr/bin/env bash
# Build the serving image and send it the REST request of docs/export.md: what SageMaker will do.
# Usage: docker-test.sh BUILD_CONTEXT MODEL_NAME PYTHON   (make docker-test; needs a Docker engine)
set -euo pipefail

context="$1"
model_name="$2"
python="$3"
image="pet-detector-docker-test:local"
port="${DOCKER_TEST_PORT:-18080}"

docker build -t "$image" "$context"
container="$(docker run -d --rm -p "127.0.0.1:$port:8080" -e "MODEL_NAME=$model_name" "$image" serve)"
trap 'docker stop "$container" >/dev/null 2>&1 || true' EXIT

for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$port/ping" >/dev/null 2>&1; then break; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$port/ping" >/dev/null || { docker logs "$container"; echo "docker-test: /ping never answered 200"; exit 1; }
sample="$(mktemp --suffix=.jpg)"
"$python" -c "from benchmarks.serving_latency import jpeg; import sys; open(sys.argv[1], 'wb').write(jpeg((500, 375)))" "$sample"
"$python" -m detkit.serve.predict "$sample" --url "http://127.0.0.1:$port/invocations" --export "$context/model/$model_name" \
  --out "${sample%.jpg}_detections.png"
echo "docker-test: passed: the container answered /ping and the REST request of docs/export.md on /invocations"
