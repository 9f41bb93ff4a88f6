//! ferry: an MPI-aware parallel staging tool that survives being killed at any instant.
//!
//! The library holds the whole engine; the `ferry` binary only parses arguments, runs a
//! [`transfer`] function on each rank and maps the [`Error`] to an exit code. Where things live:
//!
//! | concept | module |
//! |---|---|
//! | the error space (class, errno, op, path, rank) | [`error`] |
//! | collectives (one rank, N threads) | [`comm`] |
//! | collectives over MPI (feature `mpi`) | `mpi_comm` |
//! | walking sources, units, assignment to ranks | [`plan`] |
//! | copying a rank's units into temporary names | [`engine`] |
//! | per-rank journals of finished units | [`journal`] |
//! | fsync / rename discipline (the only place) | [`fsio`] |
//! | renames to final names, commit record, source removal | [`commit`] |
//! | manifest and `ferry verify` | [`manifest`] |
//! | HDF5: `--verify-hdf5`, `ferry gen` (feature `hdf5`) | [`h5`] |
//! | state directory, records, lock, registry | [`state`] |
//! | advisory locks: a run's, a destination's (the only place) | [`locks`] |
//! | `ferry status` | [`status`] |
//! | the protocol, phase by phase | [`transfer`] |
//! | signals, peers that stopped, cancel requests | [`stop`] |
//! | bounded retry of transient errors | [`retry`] |
//! | named failpoints for crash tests | [`failpoints`] |

#![warn(missing_docs)]

pub mod comm;
pub mod commit;
pub mod engine;
pub mod error;
pub mod failpoints;
pub mod fsio;
pub mod h5;
pub mod journal;
pub mod locks;
pub mod manifest;
#[cfg(feature = "mpi")]
pub mod mpi_comm;
pub mod pathser;
pub mod plan;
#[cfg(feature = "failpoints")]
pub mod powerloss;
pub mod preserve;
pub mod retry;
pub mod size;
pub mod state;
pub mod status;
pub mod stop;
pub mod transfer;
pub mod xfer;

pub use comm::{Comm, SingleComm, ThreadComm};
pub use error::{Error, ErrorClass, Result};
pub use plan::Layout;
pub use status::{State, Status};
pub use transfer::{CopyOptions, RunOptions, Summary};
