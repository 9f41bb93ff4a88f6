//! ferry's integration tests: one binary, with the tree generator and the tree oracle in `util`.
//! Multi-rank cases run as threads in this process (library) or as `ferry --ranks N` (CLI);
//! crash cases kill the real binary or trip its failpoints (feature `failpoints`). The crash
//! matrix over every failpoint is its own binary (`crash-matrix/`).

mod util;

mod bad_input;
mod copy;
#[cfg(feature = "failpoints")]
mod corruption;
mod faults;
#[cfg(feature = "hdf5")]
mod hdf5;
#[cfg(feature = "failpoints")]
mod hostile;
mod kill;
mod layouts;
#[cfg(feature = "failpoints")]
mod lifecycle;
mod security;
#[cfg(feature = "failpoints")]
mod signals;
mod xfer;
