#!/usr/bin/env bash
# An arm64 Python that runs on this x86-64 machine under qemu-user, for the slow arm64 bundle test:
#   DEST/root   Debian bookworm's python3.11 and the libraries it and the wheels need, arm64 packages unpacked
#               (not installed: nothing of the host's changes but dpkg's list of foreign architectures)
#   DEST/site   the registry's aarch64 wheels of a bundle's requirements.txt, but llama-cpp-python (an sdist)
# Usage: tests/arm64/sysroot.sh DEST REQUIREMENTS_TXT
set -euo pipefail
dest=$1
requirements=$2
python=${PYTHON:-python3}
packages="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8 libssl3
  libbz2-1.0 liblzma5 libgcc-s1 libstdc++6 libgomp1 libsqlite3-0 libuuid1 libncursesw6 libtinfo6"
platforms="--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64
  --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --only-binary=:all:"

command -v qemu-aarch64-static >/dev/null || apt-get install -y -q qemu-user-static
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -q
fi
rm -rf "$dest"
mkdir -p "$dest/debs" "$dest/root/proc" "$dest/wheels"
(cd "$dest/debs" && apt-get download -q $(for p in $packages; do echo "$p:arm64"; done))
for deb in "$dest"/debs/*.deb; do dpkg-deb -x "$deb" "$dest/root"; done

# qemu-user passes the host's x86 /proc/cpuinfo through, which onnxruntime's CPU detection cannot parse (it
# segfaults); an arm64 board has its own. qemu opens a path under -L first, so this Cortex-A76 one stands in.
for cpu in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$cpu"
done > "$dest/root/proc/cpuinfo"

grep -v '^llama-cpp-python' "$requirements" > "$dest/requirements.txt"
"$python" -m pip download -q $platforms -d "$dest/wheels" -r "$dest/requirements.txt"
"$python" -m pip install -q $platforms --no-index --find-links "$dest/wheels" --target "$dest/site" \
    -r "$dest/requirements.txt"
touch "$dest/done"
