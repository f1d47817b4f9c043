#!/bin/sh
# Installs what the executor's sandbox drivers need: for `bwrap`, bubblewrap (0.8 or newer, for a
# size-limited tmpfs) and libseccomp (the seccomp filter is compiled with it through pyseccomp);
# for `gvisor`, runsc (gVisor's runtime, Debian package `runsc`).
# Idempotent and quiet; prints one line per driver; always exits 0: a host where it cannot
# install still runs everything but the sandbox tests, which then skip and say why.
set -u

need=""
command -v bwrap >/dev/null 2>&1 || need="bubblewrap"
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
if ! "$ldconfig" -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
    need="${need:+$need }libseccomp2"
fi
# runsc is optional (bwrap is the default driver): it is asked for separately below, so that a
# distribution without it does not stop bubblewrap from being installed.
need_runsc=""
command -v runsc >/dev/null 2>&1 || need_runsc="runsc"

runsc_line() {
    if command -v runsc >/dev/null 2>&1; then
        echo "sandbox: runsc $(runsc --version 2>/dev/null | sed -n 's/^runsc version //p') installed (gvisor driver)"
    else
        echo "sandbox: could not install runsc with apt-get; for the gvisor driver run 'apt-get install -y runsc' as root (or see https://gvisor.dev/docs/user_guide/install/); the gvisor sandbox tests skip until then"
    fi
}

if [ -z "$need" ]; then
    version=$(bwrap --version 2>/dev/null | sed -n 's/^bubblewrap //p')
    case "$version" in
        0.[0-7].*|0.[0-7]) echo "sandbox: bubblewrap $version is too old (the driver needs 0.8 or newer); upgrade the bubblewrap package" ;;
        *) echo "sandbox: bubblewrap $version and libseccomp already installed" ;;
    esac
fi
if [ -z "$need$need_runsc" ]; then
    runsc_line
    exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "sandbox: missing $need${need:+ }$need_runsc; install it as root (Debian/Ubuntu: apt-get install -y $need${need:+ }$need_runsc; Fedora: dnf install -y bubblewrap libseccomp); the sandbox tests skip until then"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
install() {
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $1 >/dev/null 2>&1
}
# Refresh the package lists only when they do not know the packages or are too stale to install.
updated=""
install_fresh() {
    # shellcheck disable=SC2086
    { apt-cache show $1 >/dev/null 2>&1 && install "$1"; } \
        || { [ -z "$updated" ] && updated=1 && apt-get update -qq >/dev/null 2>&1 && install "$1"; }
}
if [ -n "$need" ]; then
    if install_fresh "$need"; then
        echo "sandbox: installed $need ($(bwrap --version 2>/dev/null || echo 'bwrap missing'))"
    else
        echo "sandbox: could not install $need with apt-get; run 'apt-get update && apt-get install -y $need' as root; the bwrap sandbox tests skip until then"
    fi
fi
if [ -n "$need_runsc" ]; then
    install_fresh runsc
    runsc_line
elif [ -n "$need" ]; then
    runsc_line
fi
exit 0
