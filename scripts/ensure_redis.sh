#!/usr/bin/env bash
# Make sure the tests' Redis answers on 127.0.0.1:6379 and that redis-server is installed
# (some tests start their own short-lived servers on free ports). Installs Debian's package
# when it is missing; never touches a Redis that already answers.
set -euo pipefail

answers() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's package" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if ! answers; then
  echo "no Redis on 127.0.0.1:6379: starting one" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/moe-gateway-redis.log
  for _ in $(seq 1 50); do answers && break; sleep 0.1; done
  answers || { echo "Redis did not start; see /tmp/moe-gateway-redis.log" >&2; exit 1; }
fi
