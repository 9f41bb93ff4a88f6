#!/usr/bin/env bash
# Install ferry and its AXL-compatible libraries under a prefix (what `make install` runs):
#   scripts/install.sh PREFIX [BUILD_DIR]
# BUILD_DIR holds the built ferry, libaxl* (default: target/release). Installs
#   PREFIX/bin/ferry
#   PREFIX/lib/libaxl.so libaxl.a libaxl_mpi.so libaxl_mpi.a
#   PREFIX/include/axl.h axl_mpi.h
#   PREFIX/share/axl/cmake/axlConfig.cmake axlConfigVersion.cmake   (find_package(axl))
#   PREFIX/lib/pkgconfig/axl.pc axl_mpi.pc
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:?usage: install.sh PREFIX [BUILD_DIR]}
build=${2:-$here/target/release}
for f in ferry libaxl.so libaxl.a libaxl_mpi.so libaxl_mpi.a; do
  if [ ! -e "$build/$f" ]; then
    echo "install: $build/$f is missing; build first (make install does)" >&2
    exit 1
  fi
done
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
version=$(sed -n 's/^#define AXL_VERSION "\(.*\)"/\1/p' "$here/axl/include/axl.h")

install -d "$prefix/bin" "$prefix/lib/pkgconfig" "$prefix/include" "$prefix/share/axl/cmake"
install -m 0755 "$build/ferry" "$prefix/bin/ferry"
install -m 0755 "$build/libaxl.so" "$build/libaxl_mpi.so" "$prefix/lib/"
install -m 0644 "$build/libaxl.a" "$build/libaxl_mpi.a" "$prefix/lib/"
install -m 0644 "$here/axl/include/axl.h" "$here/axl-mpi/include/axl_mpi.h" "$prefix/include/"
install -m 0644 "$here/axl/cmake/axlConfig.cmake" "$prefix/share/axl/cmake/"

# Same rule as AXL's (write_basic_package_version_file, SameMajorVersion).
cat > "$prefix/share/axl/cmake/axlConfigVersion.cmake" <<CMAKE
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif(PACKAGE_FIND_VERSION_MAJOR STREQUAL "${version%%.*}")
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
else()
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
endif()
CMAKE

# pkg-config (AXL ships none; these are ferry's): `pkg-config --libs [--static] axl_mpi`.
rt="-lpthread -ldl -lm -lrt -lutil -lgcc_s"
cat > "$prefix/lib/pkgconfig/axl.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: axl
Description: AXL-compatible transfer library (ferry)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -laxl
Libs.private: $rt
PC
cat > "$prefix/lib/pkgconfig/axl_mpi.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: axl_mpi
Description: AXL-compatible transfer library with the MPI calls (ferry); needs an MPI compiler wrapper
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -laxl_mpi
Libs.private: $rt
PC
echo "installed ferry and libaxl/libaxl_mpi $version (AXL interface) under $prefix"
