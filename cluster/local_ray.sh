#!/usr/bin/env bash
# A local Ray head of its own, started and stopped without touching any other Ray on this machine.
#
#   cluster/local_ray.sh start DIR [NUM_CPUS]   # prints the dashboard address; DIR/env holds RAY_GCS and RAY_DASHBOARD
#   cluster/local_ray.sh stop DIR               # stops exactly the processes that `start DIR` began
#
# `ray stop` stops every Ray process of this user on the machine (a notebook's, another run's). Here the head runs
# in its own process session with its own temp dir (DIR/ray) and free ports (GCS, dashboard, dashboard agent, Ray
# client: their defaults 6379/8265/52365/10001 would collide with a Ray already running), and `stop` kills that
# session, then whatever still runs under DIR/ray (Ray's processes outlive `ray start --block` briefly).
# Needs `ray` and `python` on PATH (the venv's), and RAY_AUTH_MODE/RAY_AUTH_TOKEN as the caller wants them.
set -euo pipefail

usage() { echo "usage: $0 start DIR [NUM_CPUS] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$(mkdir -p "$2" && cd "$2" && pwd)

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

case $cmd in
start)
    cpus=${3:-2}
    gcs_port=$(free_port) dash_port=$(free_port) agent_port=$(free_port) client_port=$(free_port)
    mkdir -p "$dir/ray"
    setsid ray start --head --block --disable-usage-stats --temp-dir="$dir/ray" --port="$gcs_port" \
        --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" --dashboard-agent-listen-port="$agent_port" \
        --ray-client-server-port="$client_port" --num-cpus="$cpus" >"$dir/ray-start.log" 2>&1 &
    echo $! >"$dir/pid"
    printf 'RAY_GCS=127.0.0.1:%s\nRAY_DASHBOARD=http://127.0.0.1:%s\n' "$gcs_port" "$dash_port" >"$dir/env"
    for _ in $(seq 120); do
        if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
            echo "ray start exited; its log ($dir/ray-start.log):" >&2; tail -n 30 "$dir/ray-start.log" >&2; exit 1
        fi
        if ray status --address="127.0.0.1:$gcs_port" >/dev/null 2>&1; then
            echo "http://127.0.0.1:$dash_port"; exit 0
        fi
        sleep 1
    done
    echo "the local Ray head did not come up in 120 s; its log: $dir/ray-start.log" >&2
    "$0" stop "$dir"
    exit 1
    ;;
stop)
    if [ -f "$dir/pid" ]; then
        pid=$(cat "$dir/pid")
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$dir/pid"
    fi
    pkill -KILL -f "$dir/ray" 2>/dev/null || true
    ;;
*) usage ;;
esac
