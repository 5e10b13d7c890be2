#!/usr/bin/env bash
# What benchmarks/gpu_checks.sh needs and the GPU host lacks (it has no network), gathered into
# .whl/ (ignored by git). Run here, where pip reaches the registry; then name .whl in the device
# tool's carry: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=570).
# The host's python is 3.12, x86-64, with a CUDA 13 torch (/work/.library/device/KINDS.md).
#   - duckdb, for the build benchmark;
#   - ctranslate2, for the translation benchmark (its manylinux wheel holds the CUDA build);
#   - pytest and what it needs (pluggy, iniconfig, packaging, pygments), pytest-timeout and
#     safetensors, for the parity tests: gpu_checks.sh installs each only where the host lacks it
#     (the image has them all today);
#   - the parity fixture: ../shared/reference-parity does not travel (only a shared/ inside the
#     checkout does), so it is copied to .whl/reference-parity when the checkout has no shared/.
# The device call carries 64 MiB in all, so the two large wheels travel as unpacked wheels in
# tar.xz (the files pip --target would install; gpu_checks.sh unpacks them into its site folder):
# ctranslate2 43 MB as a wheel, 15 MB so with its extension's debug information stripped; duckdb
# 24 MB, 16 MB so. Versions are constraints.txt's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
pin() {  # the version constraints.txt pins for $1 (case-insensitive), else $2
  local v
  v=$(grep -i -m1 "^$1==" constraints.txt 2> /dev/null | cut -d= -f3) || true
  echo "${v:-$2}"
}
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
mkdir -p .whl
wanted=("duckdb==${DUCKDB_VERSION:-$(pin duckdb 2.0.0)}" "ctranslate2==$(pin ctranslate2 4.8.5)"
        "pytest==$(pin pytest 9.2.0)" "pluggy==$(pin pluggy 1.7.0)" "iniconfig==$(pin iniconfig 2.3.1)"
        "packaging==$(pin packaging 26.3)" "pygments==$(pin pygments 2.21.0)"
        "pytest_timeout==$(pin pytest-timeout 2.4.0)" "safetensors==$(pin safetensors 0.8.0)")
# One version of each (two stop the host's install): what another version left here goes.
for spec in "${wanted[@]}"; do
  name=${spec%%==*} version=${spec##*==}
  for f in .whl/"$name"-[0-9]*; do
    [ -e "$f" ] || continue
    case $(basename "$f") in "$name-$version-"*.whl | "$name-$version.tar.xz") ;; *) echo "removing $f"; rm -f "$f" ;; esac
  done
  [ -e .whl/"$name-$version.tar.xz" ] || compgen -G ".whl/$name-$version-*.whl" > /dev/null || download "$spec"
done
for name in ctranslate2 duckdb; do
  for whl in .whl/"$name"-[0-9]*.whl; do
    [ -f "$whl" ] || continue
    "$PY" - "$whl" << 'PYEOF'
import base64, hashlib, os, shutil, subprocess, sys, tarfile, tempfile, zipfile
path = sys.argv[1]
name, version = os.path.basename(path).split("-")[:2]
out = os.path.join(os.path.dirname(path), f"{name}-{version}.tar.xz")
with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(path) as z:
        z.extractall(tmp)
        for info in z.infolist():  # zipfile drops the permissions
            if info.external_attr >> 16 and not info.is_dir():
                os.chmod(os.path.join(tmp, info.filename), (info.external_attr >> 16) & 0o777)
    ext = [os.path.join(name, f) for f in os.listdir(os.path.join(tmp, name)) if f.startswith("_ext") and f.endswith(".so")]
    if name == "ctranslate2" and ext and shutil.which("strip"):
        before = os.path.getsize(os.path.join(tmp, ext[0]))
        subprocess.run(["strip", "--strip-debug", os.path.join(tmp, ext[0])], check=True)
        data = open(os.path.join(tmp, ext[0]), "rb").read()
        print(f"{ext[0]}: {before / 1e6:.1f} MB, {len(data) / 1e6:.1f} MB without debug information")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record = next(os.path.join(tmp, d, "RECORD") for d in os.listdir(tmp) if d.endswith(".dist-info"))
        rows = [f"{ext[0]},sha256={digest},{len(data)}" if line.split(",")[0] == ext[0] else line
                for line in open(record, encoding="utf-8").read().splitlines()]
        open(record, "w", encoding="utf-8").write("\n".join(rows) + "\n")
    with tarfile.open(out + ".tmp", "w:xz") as t:
        for entry in sorted(os.listdir(tmp)):
            t.add(os.path.join(tmp, entry), arcname=entry)
os.replace(out + ".tmp", out)
os.remove(path)
print(f"{out}: {os.path.getsize(out) / 1e6:.1f} MB")
PYEOF
  done
done
# The parity fixture, where the checkout's shared/ (which travels by itself) does not hold it.
if [ ! -d shared/reference-parity ] && [ -d ../shared/reference-parity ]; then
  rm -rf .whl/reference-parity
  cp -r ../shared/reference-parity .whl/reference-parity && chmod -R u+w .whl/reference-parity
fi
ls -l .whl
# What the device call sends: tracked and untracked-not-ignored files, shared/ and .whl.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2> /dev/null | tail -1 | cut -f1)
extra=$(du -scb .whl $([ -d shared ] && echo shared) | tail -1 | cut -f1)
total=$((tree + extra))
echo "the device call would send about $((total / 1048576)) MiB of its 64 MiB"
((total < 64 * 1048576)) || { echo "over the device tool's 64 MiB: carry less" >&2; exit 1; }
