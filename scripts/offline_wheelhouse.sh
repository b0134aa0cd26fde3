#!/usr/bin/env bash
# Build a wheelhouse for an offline GPU node (run this on a machine WITH network; copy the result to the node and
# run scripts/offline_install.sh there).
#
# 1) downloads every wheel the recipe's `verl` extra needs on top of the node's preinstalled CUDA torch, for the
#    node's Python version and platform (not this machine's), from a pinned list (scripts/offline_requirements.txt:
#    73 packages, less EXCLUDE's 2 and the sdist below = 70 wheels; with antlr4 71 in all, printed at the end);
# 2) builds the one sdist-only dependency (antlr4-python3-runtime, pure Python) into a wheel;
# 3) writes SHA256SUMS of the whole files and splits files larger than SPLIT_MB into <file>.part-NN, because
#    some transfer channels cap the size of a file or of one transfer.
# With BUNDLE=1 it also installs the wheels here into a folder laid out for the node (pip --target with the
# node's platform tags), drops payload that nothing imports at run time (Ray's Java jar, the dashboard's web
# build, RLlib/Tune/Serve/Train/Data, py-spy), and packs that folder as site-bundle.tar.xz in SPLIT_MB parts:
# about 60 MB instead of 180 MB of wheels, for channels that move little data per transfer.
#
# Usage: WHEELHOUSE=wheelhouse PYTHON_VERSION=3.12 [BUNDLE=1] bash scripts/offline_wheelhouse.sh
set -xeuo pipefail

WHEELHOUSE=${WHEELHOUSE:-wheelhouse}                                    # output folder
PYTHON_VERSION=${PYTHON_VERSION:-3.12}                                  # the node's Python (verl 0.9.1: 3.10-3.12)
REQUIREMENTS=${REQUIREMENTS:-$(dirname "$0")/offline_requirements.txt}  # pinned list, one requirement a line
EXCLUDE=${EXCLUDE:-"av torchcodec"}                                     # left out: video decoding, unused for text RL
SPLIT_MB=${SPLIT_MB:-40}                                                # larger files are split into parts
BUNDLE=${BUNDLE:-0}                                                     # 1: also pack an installed, trimmed bundle
PIP=${PIP:-python3 -m pip}
# manylinux tags the node's glibc accepts; pip matches each tag exactly, so list several.
PLATFORMS=${PLATFORMS:-"manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64
manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
manylinux_2_5_x86_64 manylinux1_x86_64"}

SDIST_ONLY="antlr4-python3-runtime"
PLATFORM_ARGS=()
for p in ${PLATFORMS}; do PLATFORM_ARGS+=(--platform "$p"); done
mkdir -p "${WHEELHOUSE}"

# 1) binary wheels for the node's interpreter and platform, no dependency resolution (the list is complete)
LIST=$(mktemp)
grep -v -e '^#' -e '^$' "${REQUIREMENTS}" | grep -v "^${SDIST_ONLY}==" > "${LIST}"
for name in ${EXCLUDE}; do sed -i "/^${name}==/d" "${LIST}"; done
${PIP} download \
    --no-deps \
    --only-binary=:all: \
    --implementation cp \
    --python-version "${PYTHON_VERSION}" \
    "${PLATFORM_ARGS[@]}" \
    -d "${WHEELHOUSE}" \
    -r "${LIST}"
rm -f "${LIST}"

# 2) the sdist-only pure-Python dependency, built here (hydra-core 1.3 needs antlr4 4.9.*; without this wheel
#    an --only-binary resolver silently falls back to hydra-core 0.11 / omegaconf 1.4)
${PIP} wheel --no-deps -w "${WHEELHOUSE}" "$(grep "^${SDIST_ONLY}==" "${REQUIREMENTS}")"

# 3) optional: an installed, trimmed bundle of the same wheels
if [ "${BUNDLE}" = "1" ]; then
    SITE=$(mktemp -d)
    ${PIP} install --no-deps --no-compile --only-binary=:all: --implementation cp \
        --python-version "${PYTHON_VERSION}" "${PLATFORM_ARGS[@]}" --target "${SITE}" "${WHEELHOUSE}"/*.whl
    rm -rf "${SITE}"/ray/jars "${SITE}"/ray/dashboard/client/build "${SITE}"/ray/rllib "${SITE}"/ray/tune \
        "${SITE}"/ray/serve "${SITE}"/ray/train "${SITE}"/ray/data "${SITE}"/bin/py-spy "${SITE}"/tests
    tar -C "${SITE}" -cf - . | xz -9 -T0 > "${WHEELHOUSE}/site-bundle.tar.xz"
    rm -rf "${SITE}"
fi

# 4) checksums of the whole files, then split the large ones (offline_install.sh reassembles and checks them)
(cd "${WHEELHOUSE}" && sha256sum ./*.whl ./*.tar.xz 2>/dev/null > SHA256SUMS || true)
for f in "${WHEELHOUSE}"/*.whl "${WHEELHOUSE}"/*.tar.xz; do
    [ -e "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt $((SPLIT_MB * 1024 * 1024)) ]; then
        split -b "${SPLIT_MB}M" -d "$f" "$f.part-"
        rm "$f"
    fi
done
du -sh "${WHEELHOUSE}"
echo "$(find "${WHEELHOUSE}" -maxdepth 1 \( -name '*.whl' -o -name '*.whl.part-00' \) | wc -l) wheels in ${WHEELHOUSE}"
