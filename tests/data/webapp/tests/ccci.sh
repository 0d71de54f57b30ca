#!/bin/sh
# webapp's own tests, run by ccci after deploy with APP_DOMAIN and ABRA_DIR set: the page is the
# one this version ships, the secret is mounted, and the volume takes writes.
set -eu
stack=$(printf %s "$APP_DOMAIN" | tr . _ | cut -c1-45)
abra app ps "$APP_DOMAIN" >/dev/null
container=$(docker ps -q --filter "label=com.docker.swarm.service.name=${stack}_app" | head -n 1)
test -n "$container" || { echo "no running container of ${stack}_app"; exit 1; }
page=$(docker exec "$container" wget -q -O - --header "Host: $APP_DOMAIN" http://127.0.0.1:8080/)
echo "$page" | grep -q "webapp" || { echo "unexpected page: $page"; exit 1; }
docker exec "$container" test -s /run/secrets/db_password || { echo "the db_password secret is not mounted"; exit 1; }
docker exec "$container" sh -c 'echo written > /data/probe && cat /data/probe' | grep -q written
echo "webapp's own tests passed: page, secret and volume"
