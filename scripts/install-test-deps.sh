#!/usr/bin/env bash
# Install the system packages the tests drive for real: OpenSSH, Chromium, promtool, xrdp, FreeRDP, Xvfb.
# Idempotent: does nothing when they are present. Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /usr/bin/chromium ] || need+=(chromium)          # the sessions page is tested in a real browser
command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool checks the /metrics exposition
command -v xrdp >/dev/null 2>&1 || need+=(xrdp)               # a real RDP server as a VM
command -v xfreerdp >/dev/null 2>&1 || need+=(freerdp2-x11)   # a real RDP client
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb)
command -v xterm >/dev/null 2>&1 || need+=(xterm)             # the RDP test session's foreground program

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-test-deps: missing ${need[*]} and not root; install them with apt-get" >&2
        exit 1
    fi
fi
echo "install-test-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# openssh-server and prometheus may start services where systemd runs; the tests start their own.
