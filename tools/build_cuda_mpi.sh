#!/bin/bash
# Build a CUDA-aware Open MPI and mpi4py wheels against it, from packages the registries serve, into a
# small relocatable folder that can be copied (or carried) to a GPU machine that has no MPI.
#
#   Open MPI   Debian's source package (apt-get source; no change to the system's apt configuration)
#   cuda.h     the PyPI wheel nvidia-cuda-runtime-cu12 (no CUDA toolkit needed on the build machine)
#   libcuda    a stub made here from cuda.h, used only to link; the driver's libcuda.so.1 is loaded at
#              run time by the CUDA components (built as plug-ins, so libmpi itself needs no GPU)
#   mpi4py     its sdist from PyPI, one wheel per interpreter in PYTHONS
#
# Usage:   bash tools/build_cuda_mpi.sh [OUT]        (OUT default: <repo>/.cudampi, ignored by git)
#   WORK=/tmp/cudampi-build       sources and the build tree (kept: a second run resumes)
#   PYTHONS="python3 python3.12"  interpreters to build mpi4py wheels for (the GPU machine's first)
#   OMPI_DEBIAN=5.0.7-1           Debian version of the openmpi source package (suite trixie)
#   OMPI_TARBALL=path             an Open MPI release tarball instead of the Debian source
#   CUDA_HEADERS=12.4.127         version of nvidia-cuda-runtime-cu12 to take cuda.h from
#   MPI4PY=4.1.2                  mpi4py version
#   JOBS=2                        make -j (runs under nice -n 19)
# Result:  OUT/prefix (Open MPI; source OUT/prefix/env.sh to use it wherever it lies), OUT/wheels
# (mpi4py-*.whl). Needs gcc, make, apt-get, pip; about 20 minutes on 2 cores. See docs/gpu.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/.cudampi}
WORK=${WORK:-/tmp/cudampi-build}
PYTHONS=${PYTHONS:-python3}
OMPI_DEBIAN=${OMPI_DEBIAN:-5.0.7-1}
OMPI_TARBALL=${OMPI_TARBALL:-}
CUDA_HEADERS=${CUDA_HEADERS:-12.4.127}
MPI4PY=${MPI4PY:-4.1.2}
JOBS=${JOBS:-2}
PIP=(python3 -m pip)
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd) OUT=$(cd "$OUT" && pwd)
PREFIX=$OUT/prefix
say() { echo "==> $(date +%T) $*"; }
T0=$SECONDS

# ---------------------------------------------------------------- sources
fetch_openmpi() {  # -> $WORK/src/openmpi-<version>/
    if [ -n "$OMPI_TARBALL" ]; then
        mkdir -p "$WORK/src" && tar -xf "$OMPI_TARBALL" -C "$WORK/src"
        return
    fi
    local apt="$WORK/apt" suite=trixie
    case $OMPI_DEBIAN in 4.1.4*) suite=bookworm ;; esac
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$WORK/src"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
        > "$apt/sources.list"
    local opts=(-o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" -qq update
    (cd "$WORK/src" && apt-get "${opts[@]}" source --download-only "openmpi=$OMPI_DEBIAN")
    tar -xf "$WORK/src/openmpi_${OMPI_DEBIAN%-*}.orig.tar.xz" -C "$WORK/src"
}

fetch_cuda_headers() {  # -> $WORK/cuda/include/cuda.h
    "${PIP[@]}" download -q --no-deps --only-binary :all: --platform manylinux2014_x86_64 \
        --python-version 3.11 -d "$WORK/dl" "nvidia-cuda-runtime-cu12==$CUDA_HEADERS"
    rm -rf "$WORK/cuda" && mkdir -p "$WORK/cuda"
    python3 - "$WORK/dl"/nvidia_cuda_runtime_cu12-"$CUDA_HEADERS"-*.whl "$WORK/cuda" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith("nvidia/cuda_runtime/include/"):
            wheel.extract(name, sys.argv[2])
EOF
    mv "$WORK/cuda/nvidia/cuda_runtime/include" "$WORK/cuda/include" && rm -rf "$WORK/cuda/nvidia"
}

# A libcuda.so that defines every driver function cuda.h declares, under its plain name (configure links
# cuMemFree) and the name the header maps it to (cuMemFree_v2, what Open MPI's code calls), and does
# nothing: enough to link, never loaded (its soname is the driver's, libcuda.so.1; it stays out of the prefix).
make_libcuda_stub() {  # -> $WORK/stubs/libcuda.so
    mkdir -p "$WORK/stubs"
    { cat "$WORK/cuda/include/cuda.h"; gcc -E -P "$WORK/cuda/include/cuda.h"; } \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' \
        | sort -u | awk '{print "int " $1 "(void) { return 999; }"}' > "$WORK/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/stubs/libcuda.so" "$WORK/stubs/libcuda_stub.c"
    echo "stub libcuda.so: $(wc -l < "$WORK/stubs/libcuda_stub.c") functions"
}

# ---------------------------------------------------------------- Open MPI
build_openmpi() {
    local src build
    src=$(find "$WORK/src" -maxdepth 1 -type d -name 'openmpi-*' | sort | tail -1)
    build=$WORK/build
    mkdir -p "$build"
    cd "$build"
    if [ ! -f Makefile ]; then
        # C only; no Fortran, OpenSHMEM, MPI-IO or man pages; PMIx, PRRTE, hwloc and libevent built in,
        # so the prefix needs nothing from the system beyond libc (and libcuda.so.1 on a GPU machine).
        nice -n 19 "$src/configure" --prefix="$PREFIX" \
            --with-cuda="$WORK/cuda" --with-cuda-libdir="$WORK/stubs" \
            --disable-mpi-fortran --disable-oshmem --disable-io-romio --disable-sphinx \
            --enable-mca-no-build=io,fcoll,fbtl,fs,sharedfp,vprotocol,topo-treematch,coll-monitoring,pml-monitoring,osc-monitoring \
            --with-hwloc=internal --with-libevent=internal --with-pmix=internal --with-prrte=internal \
            --without-ucx --without-ofi --without-psm2 --disable-static \
            > configure.log 2>&1 || { tail -40 configure.log; return 1; }
        grep -A3 -i "^Accelerators" configure.log
        grep -q "^CUDA support: yes" configure.log || { echo "configure found no CUDA support"; rm Makefile; return 1; }
    fi
    nice -n 19 make -j"$JOBS" > make.log 2>&1 || { grep -B5 -A5 -m3 'rror' make.log | tail -40; return 1; }
    rm -rf "$PREFIX"
    nice -n 19 make install > install.log 2>&1 || { tail -40 install.log; return 1; }
}

# Strip, drop what a run does not read (docs, man pages, libtool archives, pkg-config files, headers
# beyond mpi.h and its kin), and add env.sh, which points Open MPI, PRRTE and PMIx at the folder's
# current location (OPAL_PREFIX and kin): the prefix can be moved or carried anywhere.
slim_prefix() {
    rm -rf "$PREFIX"/share/man "$PREFIX"/share/doc "$PREFIX"/lib/pkgconfig "$PREFIX"/include/pmix* \
        "$PREFIX"/include/prte* "$PREFIX"/include/openmpi/ompi/mpi/java
    find "$PREFIX" -name '*.la' -delete
    find "$PREFIX/lib" "$PREFIX/bin" -type f \( -name '*.so*' -o -perm -u+x \) -exec sh -c \
        'file -b "$1" | grep -q ELF && strip --strip-unneeded "$1"' _ {} \;
    # Where no driver is (a CPU machine), the CUDA plug-ins cannot load libcuda.so.1: not worth a warning
    # from every process (MPIX_Query_cuda_support() = 0 then says so, and mpipar prints its decision).
    echo "mca_base_component_show_load_errors = ^accelerator/cuda,rcache/gpusm,rcache/rgpusm" \
        >> "$PREFIX/etc/openmpi-mca-params.conf"
    cat > "$PREFIX/env.sh" <<'EOF'
# source this file: use the Open MPI in this folder, wherever the folder lies now
_cudampi=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OPAL_PREFIX=$_cudampi PRTE_PREFIX=$_cudampi PMIX_PREFIX=$_cudampi
export PATH=$_cudampi/bin:$PATH LD_LIBRARY_PATH=$_cudampi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
unset _cudampi
EOF
}

check_openmpi() {
    # shellcheck disable=SC1091
    (source "$PREFIX/env.sh"
     ompi_info | head -3
     echo "built with CUDA: $(ompi_info --parsable --all | grep -E '^mca:mpi:base:param:mpi_built_with_cuda_support:value' | cut -d: -f7)"
     ompi_info | grep -iE 'accelerator|smcuda|coll: cuda|MCA rcache: (gpusm|rgpusm)' || true
     echo "libmpi needs: $(readelf -d "$PREFIX/lib/libmpi.so" | grep -o 'NEEDED.*' | grep -oE '\[.*\]' | tr '\n' ' ')"
     echo "prefix size: $(du -sh "$PREFIX" | cut -f1)")
}

# ---------------------------------------------------------------- mpi4py
build_mpi4py() {
    mkdir -p "$OUT/wheels" "$WORK/dl"
    [ -f "$WORK/dl/mpi4py-$MPI4PY.tar.gz" ] || "${PIP[@]}" download -q --no-deps --no-binary :all: \
        --no-build-isolation -d "$WORK/dl" "mpi4py==$MPI4PY"
    local python
    for python in $PYTHONS; do
        say "mpi4py $MPI4PY for $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
        # shellcheck disable=SC1091
        (source "$PREFIX/env.sh"
         MPICC=$PREFIX/bin/mpicc nice -n 19 "$python" -m pip wheel -q --no-deps -w "$OUT/wheels" \
             "$WORK/dl/mpi4py-$MPI4PY.tar.gz")
    done
    "${PIP[@]}" download -q --no-deps -d "$OUT/wheels" pytest-mpi==0.6  # the GPU check's test runner, pure Python
    ls -l "$OUT/wheels"
}

cd "$WORK"
say "work $WORK, out $OUT"
ls -d "$WORK"/src/openmpi-*/ >/dev/null 2>&1 || { say "fetch Open MPI source"; fetch_openmpi; }
[ -f "$WORK/cuda/include/cuda.h" ] || { say "fetch cuda.h ($CUDA_HEADERS)"; fetch_cuda_headers; }
[ -f "$WORK/stubs/libcuda.so" ] || { say "stub libcuda.so"; make_libcuda_stub; }
say "build Open MPI (log: $WORK/build/{configure,make,install}.log)"
build_openmpi
slim_prefix
check_openmpi
say "build mpi4py"
build_mpi4py
say "done in $((SECONDS - T0)) s: $(du -sh "$OUT" | cut -f1) in $OUT"
