# Copyright ferry contributors.
#
# SPDX-License-Identifier: (Apache-2.0 OR MIT)

import filecmp
import glob
import os
import re

from spack_repo.builtin.build_systems import cargo
from spack_repo.builtin.build_systems.cargo import CargoPackage

from spack.package import *

# This package lives inside the ferry checkout, at
# <checkout>/spack/spack_repo/ferry/packages/ferry/package.py, so the checkout is five directory
# levels above this file's directory. ``ferry@main`` clones its committed ``main`` branch from there.
_CHECKOUT = os.path.realpath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 5))


# Building from a local checkout (there is no published release tarball yet):
#
# * `spack install ferry@main` clones the *committed* `main` branch of the checkout that holds
#   this package repository (`git = file://<checkout>`, derived from this file's location).
# * To build the working tree as it is, uncommitted edits included, use Spack's development
#   workflow in an environment (builds in place; cargo reuses <checkout>/target):
#
#       spack env create -d ferry-env && spack env activate ferry-env
#       spack add ferry@main +mpi
#       spack develop --path /path/to/ferry ferry@main
#       spack install


class Ferry(CargoPackage):
    """MPI-aware parallel staging tool: resumable, crash-consistent copies of checkpoints and
    datasets between HPC storage tiers (node-local SSD or burst buffer and the parallel file
    system), with every rank of a job copying its share at once. Killed at any instant,
    `ferry resume ID` finishes the job and the destination is committed exactly once."""

    # No public home page yet: the checkout's README is the documentation.
    homepage = f"file://{_CHECKOUT}/README.md"
    git = f"file://{_CHECKOUT}"

    license("MIT OR Apache-2.0")

    version("main", branch="main")

    variant("mpi", default=True, description="Real MPI ranks through rsmpi (cargo feature mpi)")
    variant("hdf5", default=False, description="HDF5 support (cargo feature hdf5)")

    # Cargo.toml: edition 2021, rust-version = "1.89".
    depends_on("rust@1.89:", type="build")
    # The linker, and the rsmpi C shim (compiled through mpicc).
    depends_on("c", type="build")

    with when("+mpi"):
        depends_on("mpi")
        # mpi-sys generates its bindings with bindgen, which loads libclang at build time.
        depends_on("llvm+clang", type="build")
        # build-probe-mpi falls back to pkg-config when mpicc is unusable.
        depends_on("pkgconfig", type="build")

    with when("+hdf5"):
        # hdf5-metno-sys links the system libhdf5 (HDF5 1.8.4 or newer), found via HDF5_DIR.
        depends_on("hdf5@1.8.4:")
        # A ferry without MPI must not pull MPI in through a parallel HDF5.
        depends_on("hdf5~mpi", when="~mpi")
        depends_on("pkgconfig", type="build")

    # Stand-alone tests: `spack test run ferry`.

    def _ferry(self):
        return which(self.prefix.bin.ferry, required=True)

    def test_version(self):
        """ferry --version prints the name and version"""
        out = self._ferry()("--version", output=str, error=str)
        assert re.match(r"ferry \d+\.\d+\.\d+", out), f"unexpected --version output: {out!r}"
        # The binary says which optional parts it was built with: they must match the variants.
        for name in ("mpi", "hdf5"):
            want = f"+{name}" if self.spec.satisfies(f"+{name}") else f"~{name}"
            assert want in out, f"built {self.spec.format('{variants}')}, ferry says {out!r}"
        if re.fullmatch(r"[\d.]+", str(self.spec.version)):  # a release, not @main
            assert str(self.spec.version) in out

    def test_copy(self):
        """ferry copy of a small tree, then ferry verify against its manifest"""
        ferry = self._ferry()
        # The transfer registry goes into the test stage, not the user's ~/.local/state.
        env = {"FERRY_HOME": os.path.abspath("ferry-home")}
        if os.geteuid() == 0:
            # Open MPI refuses root without these (harmless for other MPIs and for ~mpi).
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")

        src, dst, state = "ferry-src", "ferry-dst", "ferry-state"
        files = {
            "a.txt": b"hello from spack test\n",
            join_path("sub", "b.bin"): bytes(range(256)) * 4096,  # 1 MiB
            join_path("sub", "empty"): b"",
        }
        for rel, data in files.items():
            path = join_path(src, rel)
            mkdirp(os.path.dirname(path))
            with open(path, "wb") as f:
                f.write(data)

        out = ferry(
            "copy", "--quiet", "--state-dir", state, src, dst, output=str, error=str, extra_env=env
        )
        lines = out.split()
        assert lines, "ferry copy printed no transfer id"
        transfer_id = lines[0]

        for rel in files:
            assert filecmp.cmp(join_path(src, rel), join_path(dst, rel), shallow=False), rel

        status = ferry("status", transfer_id, "--state-dir", state, output=str, extra_env=env)
        assert "committed" in status, status
        ferry("verify", transfer_id, "--state-dir", state, extra_env=env)


class CargoBuilder(cargo.CargoBuilder):
    def setup_build_environment(self, env: EnvironmentModifications) -> None:
        spec = self.spec
        if spec.satisfies("+mpi"):
            # build-probe-mpi asks $MPICC (else `mpicc` on PATH) for `-show`: point it at the
            # MPI Spack chose. MPI_PKG_CONFIG (a path to mpi.pc) would take precedence; unset it
            # so a stray value from the user's environment cannot pick another MPI.
            mpi = spec["mpi"]
            mpicc = getattr(mpi, "mpicc", None) or join_path(mpi.prefix.bin, "mpicc")
            env.set("MPICC", mpicc)
            env.unset("MPI_PKG_CONFIG")
            # clang-sys (bindgen) finds libclang through LIBCLANG_PATH.
            env.set("LIBCLANG_PATH", self._libclang_dir())
        if spec.satisfies("+hdf5"):
            env.set("HDF5_DIR", spec["hdf5"].prefix)

    def _libclang_dir(self) -> str:
        prefix = self.spec["llvm"].prefix
        for libdir in (prefix.lib, prefix.lib64, join_path(prefix.lib, "x86_64-linux-gnu")):
            if glob.glob(join_path(libdir, "libclang*.so*")) or glob.glob(
                join_path(libdir, "libclang*.dylib")
            ):
                return libdir
        return prefix.lib

    @run_before("build")
    def check_cargo_features(self):
        """Fail early, with a clear message, if the checkout lacks a requested cargo feature."""
        with open(join_path(self.build_directory, "Cargo.toml"), encoding="utf-8") as f:
            manifest = f.read()
        features = manifest.partition("[features]")[2].split("\n[", 1)[0]
        for name in self.cargo_features:
            if not re.search(rf"^\s*{name}\s*=", features, re.MULTILINE):
                raise InstallError(
                    f"ferry: this checkout's Cargo.toml has no cargo feature '{name}' "
                    f"(asked for by +{name}); build with ~{name} or use a newer checkout"
                )

    @property
    def cargo_features(self):
        return [name for name in ("mpi", "hdf5") if self.spec.satisfies(f"+{name}")]

    @property
    def build_args(self):
        features = self.cargo_features
        args = ["--locked", "--no-default-features"]
        if features:
            args += ["--features", ",".join(features)]
        return args

    @property
    def install_root(self):
        # Not `out/` in the source tree (the default): with `spack develop` that tree is the
        # user's checkout.
        return join_path(self.pkg.stage.path, "cargo-install")

    def build(self, pkg, spec, prefix):
        with working_dir(self.build_directory):
            pkg.module.cargo(
                "install",
                "--root",
                self.install_root,
                "--path",
                ".",
                *self.std_build_args,
                *self.build_args,
            )

    def install(self, pkg, spec, prefix):
        mkdirp(prefix.bin)
        install(join_path(self.install_root, "bin", "ferry"), prefix.bin)

        # Slurm job scripts (stage-in/stage-out/resume ...) go to share/ferry/slurm.
        slurm = join_path(self.build_directory, "slurm")
        if os.path.isdir(slurm):
            install_tree(slurm, join_path(prefix.share, "ferry", "slurm"))
        docs = join_path(self.build_directory, "docs")
        if os.path.isdir(docs):
            install_tree(docs, join_path(prefix.share, "doc", "ferry"))
