#!/bin/sh
# Installs what the executor's `bwrap` sandbox driver needs: bubblewrap (0.8 or newer, for a
# size-limited tmpfs) and libseccomp (the seccomp filter is compiled with it through pyseccomp).
# Idempotent and quiet; prints one line; always exits 0: a host where it cannot install still
# runs everything but the sandbox tests, which then skip and say why.
set -u

need=""
command -v bwrap >/dev/null 2>&1 || need="bubblewrap"
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
if ! "$ldconfig" -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
    need="${need:+$need }libseccomp2"
fi

if [ -z "$need" ]; then
    version=$(bwrap --version 2>/dev/null | sed -n 's/^bubblewrap //p')
    case "$version" in
        0.[0-7].*|0.[0-7]) echo "sandbox: bubblewrap $version is too old (the driver needs 0.8 or newer); upgrade the bubblewrap package" ;;
        *) echo "sandbox: bubblewrap $version and libseccomp already installed" ;;
    esac
    exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "sandbox: missing $need; install it as root (Debian/Ubuntu: apt-get install -y $need; Fedora: dnf install -y bubblewrap libseccomp); the bwrap sandbox tests skip until then"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
install() {
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null 2>&1
}
# Refresh the package lists only when they do not know the packages or are too stale to install.
# shellcheck disable=SC2086
if { apt-cache show $need >/dev/null 2>&1 && install; } \
    || { apt-get update -qq >/dev/null 2>&1 && install; }; then
    echo "sandbox: installed $need ($(bwrap --version 2>/dev/null || echo 'bwrap missing'))"
else
    echo "sandbox: could not install $need with apt-get; run 'apt-get update && apt-get install -y $need' as root; the bwrap sandbox tests skip until then"
fi
exit 0
