#!/bin/sh
# Builds the Corral image without a container daemon (`make image`): the same image as
# deploy/docker/Dockerfile, from the same Debian packages (packages.txt) and the same locked
# Python dependencies (pyproject.toml's pins). mmdebstrap makes the root file system, umoci packs
# it into an OCI image layout; then the image is unpacked again and checked: bubblewrap, runsc and
# tini run, the services import, and each sandbox driver starts a real sandbox in it whose worker
# answers Ready (image_check.py).
#
# Usage: build-image.sh OUT_DIR PYTHON TAG
#   OUT_DIR  where the image goes: OUT_DIR/oci (an OCI image layout, reference oci:TAG) and
#            OUT_DIR/corral-TAG.oci.tar (the same, as one file: an oci-archive)
#   PYTHON   a Python (3.11 or later) with pip, which reads pyproject.toml's pins
#   TAG      the image's tag
# Needs root (mmdebstrap, umoci unpack, bwrap as root) and Debian's mmdebstrap and umoci
# (`apt-get install mmdebstrap umoci`); reaches Debian's and PyPI's package servers.
set -eu

out=$1
python=$2
tag=$3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
suite=bookworm
venv=/opt/corral/venv

say() { echo "image: $*" >&2; }
fail() { echo "image: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (mmdebstrap and umoci unpack); run 'sudo make image'"
for tool in mmdebstrap umoci bwrap; do
    command -v "$tool" >/dev/null 2>&1 \
        || fail "needs $tool: apt-get install -y mmdebstrap umoci bubblewrap"
done
"$python" -c 'import tomllib' 2>/dev/null || fail "$python cannot read pyproject.toml: it needs Python 3.11 or later"
[ -f "$repo/corral/sandbox/v1/sandbox_pb2.py" ] || fail "the generated code is missing: run 'make proto'"

work=$out/work
rm -rf "$work" "$out/oci" "$out/corral-$tag.oci.tar"
mkdir -p "$work/stage/app"
trap 'rm -rf "$work"' EXIT

say "1/5 staging the code and the locked Python dependencies (pyproject.toml's pins)"
"$python" -c "import tomllib; print('\n'.join(tomllib.load(open('$repo/pyproject.toml', 'rb'))['project']['dependencies']))" \
    > "$work/stage/requirements.txt"
# pip inside the image trusts what this host's pip trusts.
cp "$("$python" -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)" \
    "$work/stage/ca-certificates.crt"
# The code as the Dockerfile copies it: the packages (with the generated contracts), not the
# checkout's caches; setup_runtime.py installs the agents' runtime inside the image.
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' \
    -cf - pyproject.toml README.md corral services scripts/setup_runtime.py \
    | tar -C "$work/stage/app" -xf -

packages=$(grep -v '^#' "$here/packages.txt" | grep . | paste -sd, -)
say "2/5 building the root file system (Debian $suite: $packages) with mmdebstrap"
# Inside the chroot, with the host's pip settings left outside (env -i): a venv holding the
# locked dependencies, resolved for the image's own interpreter (Debian's 3.11.2 needs a package
# more than a later 3.11 does); /app on its path (the Dockerfile's editable install, without
# build tools); the service user; the agents' runtime (/opt/corral-runtime/<id>) that the bwrap
# and gvisor sandboxes run.
cat > "$work/stage/setup.sh" <<SETUP
set -e
groupadd --system --gid 10001 corral
useradd --system --uid 10001 --gid corral --home-dir /var/lib/corral --create-home corral
python3 -m venv $venv
$venv/bin/pip install -q --disable-pip-version-check --no-cache-dir --only-binary=:all: \\
    --cert /tmp/stage/ca-certificates.crt -r /tmp/stage/requirements.txt
echo /app > "\$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/corral-app.pth"
printf '#!$venv/bin/python\\nfrom corral.cli import main\\nmain()\\n' > $venv/bin/corral
chmod 755 $venv/bin/corral
cd /app && $venv/bin/python scripts/setup_runtime.py
$venv/bin/python -m compileall -q /app/corral /app/services
SETUP
mmdebstrap --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="mkdir -p \"\$1/tmp/stage\"" \
    --customize-hook="sync-in $work/stage /tmp/stage" \
    --customize-hook="mv \"\$1/tmp/stage/app\" \"\$1/app\"" \
    --customize-hook="chroot \"\$1\" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root sh /tmp/stage/setup.sh" \
    --customize-hook="rm -rf \"\$1/tmp/stage\" \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/*" \
    "$suite" "$work/rootfs.tar" >&2
say "    root file system: $(du -h "$work/rootfs.tar" | cut -f1)"

say "3/5 packing it as an OCI image ($out/oci, reference oci:$tag) with umoci"
image="$out/oci:$tag"
umoci init --layout "$out/oci"
umoci new --image "$image"
umoci raw add-layer --image "$image" "$work/rootfs.tar"
# What the Dockerfile's ENV, USER, WORKDIR, ENTRYPOINT and CMD say.
umoci config --image "$image" \
    --config.env "PATH=$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.env PYTHONDONTWRITEBYTECODE=1 --config.env PYTHONUNBUFFERED=1 \
    --config.env CORRAL_DATA_DIR=/var/lib/corral \
    --config.user 10001:10001 --config.workingdir /app \
    --config.entrypoint /usr/bin/tini --config.entrypoint=-- \
    --config.cmd python --config.cmd=-m --config.cmd services.router \
    --config.exposedports 50051/tcp --config.exposedports 50052/tcp \
    --config.exposedports 50053/tcp --config.exposedports 50054/tcp \
    --config.exposedports 50055/tcp \
    --config.label "org.opencontainers.image.title=corral" \
    --config.label "org.opencontainers.image.version=$tag"
umoci gc --layout "$out/oci"

say "4/5 checking the image: unpacking it and running its programs"
umoci unpack --image "$image" "$work/check" >/dev/null
rootfs=$work/check/rootfs
# The image's own file system as / (as root, the way the executor runs in deploy/k8s), with the
# host's /sys so that the drivers find writable cgroups as in a privileged pod.
in_image() {
    bwrap --bind "$rootfs" / --proc /proc --dev /dev --bind /sys /sys --tmpfs /tmp \
        --ro-bind "$here/image_check.py" /tmp/image_check.py \
        --unshare-pid --unshare-ipc --die-with-parent --chdir /app --clearenv \
        --setenv PATH "$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" --setenv HOME /root -- "$@"
}
in_image bwrap --version >&2
in_image runsc --version | head -1 >&2
in_image tini --version >&2
# Every service imports, the agents' runtime is there, and each driver starts a real sandbox.
in_image python /tmp/image_check.py >&2
in_image corral --help >/dev/null
[ "$(stat -c %u:%g "$rootfs/var/lib/corral")" = 10001:10001 ] || fail "/var/lib/corral is not the service user's"

say "5/5 writing $out/corral-$tag.oci.tar"
tar -C "$out/oci" -cf "$out/corral-$tag.oci.tar" .
say "done: $(du -sh "$out/oci" | cut -f1) in $out/oci"
say "push it with: skopeo copy oci:$out/oci:$tag docker://registry.example.com/corral:$tag"
