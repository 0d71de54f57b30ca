#!/bin/sh
# Deploy the test stack as abra would (an external secret, a versioned config, `stack deploy`),
# then wait through the Docker API (curl on its socket: a docker CLI call costs seconds under
# TCG) until `web` is healthy and answers through the routing mesh. Prints ::metric lines.
#   STACK (app), IMAGE (ccci/busybox:latest), MARKER: written into the served config,
#   COMPOSE (compose.yml; compose.one.yml: web alone).
set -eu
cd "$(dirname "$0")"
STACK=${STACK:-app} IMAGE=${IMAGE:-ccci/busybox:latest} DOMAIN=${DOMAIN:-app.ci.localhost} INDEX_VERSION=v1
export STACK IMAGE DOMAIN INDEX_VERSION
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { echo "$(uptime_s) $1" | awk '{printf "%.1f", $1 - $2}'; }
api() { curl -fsS --max-time 30 --unix-socket /var/run/docker.sock "http://docker$1"; }
t0=$(uptime_s)
printf '<h1>%s</h1>\n' "${MARKER:-hello}" > index.html
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | docker secret create "${STACK}_token_v1" - > /dev/null
docker stack deploy --resolve-image never -c "${COMPOSE:-compose.yml}" "$STACK"
echo "::metric deploy_cli_s=$(since "$t0")"
healthy='/containers/json?filters=%7B%22health%22%3A%5B%22healthy%22%5D%2C%22label%22%3A%5B%22com.docker.stack.namespace%3D'"$STACK"'%22%5D%7D'
n=0
until api "$healthy" | grep -q '"Id"'; do
  n=$((n + 1))
  if [ $n -gt 1200 ]; then
    echo "web is not healthy after 20 minutes:"
    docker service ps --no-trunc "${STACK}_web" || true
    exit 1
  fi
  sleep 1
done
echo "::metric healthy_s=$(since "$t0")"
n=0
until curl -fsS --max-time 10 -o /tmp/web.out http://127.0.0.1:8080/ 2> /dev/null; do
  n=$((n + 1))
  [ $n -le 300 ] || { echo "the routing mesh does not answer on 8080"; exit 1; }
  sleep 1
done
echo "::metric http_s=$(since "$t0")"
cat /tmp/web.out
