#!/usr/bin/env bash
# Install the system packages the tests drive for real (Debian 12): OpenSSH, Chromium, promtool,
# xrdp with its Xorg backend, FreeRDP, Xvfb, xterm. Each package is checked by the file or command
# the tests (or the daemons they start) actually run, so a half-installed machine is caught too.
# Idempotent and quiet: does nothing when all are present; needs root (or sudo) only to install.
# apt-get runs with --no-install-recommends, so everything needed is named here, recommends included.
set -euo pipefail

missing=()   # "package:what" for every check that fails
need() {     # need PACKAGE WHAT...: WHAT is an absolute path (must exist) or a command on PATH
    local pkg=$1 what
    shift
    for what in "$@"; do
        if [[ $what == /* ]]; then [ -e "$what" ] && continue; else command -v "$what" >/dev/null 2>&1 && continue; fi
        missing+=("$pkg:$what")
    done
}

check_all() {
    missing=()
    # The SSH tests: the real OpenSSH client (ssh, scp, sftp, ssh-keygen for certificates) and sshd as the VMs.
    need openssh-client ssh scp sftp ssh-keygen
    need openssh-server /usr/sbin/sshd
    # The sessions page is tested in Debian's Chromium through Playwright (tests/e2e/test_ui.py).
    need chromium /usr/bin/chromium
    # promtool checks the /metrics exposition (tests/e2e/test_metrics.py).
    need prometheus promtool
    # A real RDP server as a VM (tests/support/rdp.py): xrdp, its session manager and channel server.
    need xrdp /usr/sbin/xrdp /usr/sbin/xrdp-sesman /usr/sbin/xrdp-chansrv /etc/xrdp/xrdp.ini /etc/xrdp/sesman.ini
    # xrdp's desktop backend, only *recommended* by xrdp: without it sesman logs the user in and then
    # cannot start an X server, and the client hangs. Its config (sesman passes -config xrdp/xorg.conf)
    # and driver, and the Xorg that sesman runs ([Xorg] param=/usr/lib/xorg/Xorg in sesman.ini).
    need xorgxrdp /etc/X11/xrdp/xorg.conf /usr/lib/xorg/modules/drivers/xrdpdev_drv.so
    need xserver-xorg-core /usr/lib/xorg/Xorg
    # sesman writes the session's X cookie with `xauth`; Xorg compiles the keymap with `xkbcomp`.
    need xauth xauth
    need x11-xkb-utils xkbcomp
    # The RDP session's foreground program (the test login's startwm.sh runs xterm).
    need xterm xterm
    # A real RDP client, and the X display it needs even for +auth-only.
    need freerdp2-x11 xfreerdp
    need xvfb Xvfb
    # The RDP fixtures make and remove a login per run, and follow xrdp's logs with `tail -F`.
    need passwd /usr/sbin/useradd /usr/sbin/userdel /usr/sbin/chpasswd
    need coreutils tail id
    # curl on /v1/events (tests/e2e/test_daemon.py), and in the commands `make demo` prints.
    need curl curl
    # haproxy in TCP mode with send-proxy-v2 in front of the gateway (tests/hostile/test_proxy_protocol.py).
    need haproxy /usr/sbin/haproxy
    need redis-server /usr/bin/redis-server   # the cluster tests run their own on loopback
    # The browser terminal test runs vi on the VM (the test sshd is this machine): vim-tiny provides it if missing.
    need vim-tiny vi
    # `bastion completion bash|zsh` is tried in both shells (tests/e2e/test_completion.py).
    need bash bash
    need zsh zsh
}

check_all
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]%%:*}" | sort -u)

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then as_root=(sudo); else
        echo "install-test-deps: missing ${missing[*]}; not root: install ${pkgs[*]} with apt-get" >&2
        exit 1
    fi
fi
echo "install-test-deps: installing ${pkgs[*]}" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq)
if ! { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-test-deps: apt-get failed installing ${pkgs[*]}" >&2
    exit 1
fi
# openssh-server, prometheus and xrdp may start services where systemd runs; the tests start their own
# (and need xrdp-sesman's port 3350 free: the RDP tests say so if a system sesman holds it).
check_all
if [ ${#missing[@]} -ne 0 ]; then
    echo "install-test-deps: still missing after install: ${missing[*]}" >&2
    exit 1
fi
