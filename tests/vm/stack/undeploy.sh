#!/bin/sh
# Remove the test stack and its external secret; wait through the Docker API until the
# stack's containers and networks are gone. Prints ::metric lines.
set -eu
STACK=${STACK:-app}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { echo "$(uptime_s) $1" | awk '{printf "%.1f", $1 - $2}'; }
api() { curl -fsS --max-time 30 --unix-socket /var/run/docker.sock "http://docker$1"; }
t0=$(uptime_s)
docker stack rm "$STACK"
label='%7B%22label%22%3A%5B%22com.docker.stack.namespace%3D'"$STACK"'%22%5D%7D'
n=0
while api "/containers/json?all=1&filters=$label" | grep -q '"Id"' || api "/networks?filters=$label" | grep -q '"Id"'; do
  n=$((n + 1))
  [ $n -le 600 ] || { echo "the stack is still there after 10 minutes"; exit 1; }
  sleep 1
done
docker secret rm "${STACK}_token_v1" > /dev/null
echo "::metric removed_s=$(since "$t0")"
