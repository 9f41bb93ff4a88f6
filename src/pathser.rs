//! Paths in state files: lossless for any byte string, readable for the usual UTF-8 names.
//!
//! A path that is valid UTF-8 is stored as itself. Any other path is stored as
//! `"\u0000hex:<hex bytes>"`: a real path never contains NUL, so the two cannot be confused.
//! This module only encodes; it never touches the file system.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serializer};

const HEX_TAG: &str = "\u{0}hex:";

/// Encode a path as a string that [`decode`] turns back into the same bytes.
pub fn encode(p: &Path) -> String {
    match p.to_str() {
        Some(s) => s.to_string(),
        None => {
            let mut s = String::from(HEX_TAG);
            for b in p.as_os_str().as_bytes() {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
    }
}

/// Decode a string made by [`encode`].
pub fn decode(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix(HEX_TAG) {
        None => Ok(PathBuf::from(s)),
        Some(hex) => {
            if hex.len() % 2 != 0 {
                return Err(format!("bad hex path {s:?}"));
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| format!("bad hex path {s:?}: {e}"))?;
            Ok(PathBuf::from(OsString::from_vec(bytes)))
        }
    }
}

/// `#[serde(with = "crate::pathser")]` for `PathBuf`.
pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&encode(p))
}

/// `#[serde(with = "crate::pathser")]` for `PathBuf`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let s = String::deserialize(d)?;
    decode(&s).map_err(serde::de::Error::custom)
}

/// `#[serde(with = "crate::pathser::opt")]` for `Option<PathBuf>`.
pub mod opt {
    use super::*;

    /// Serialize an optional path.
    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(&encode(p)),
            None => s.serialize_none(),
        }
    }

    /// Deserialize an optional path.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| decode(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `#[serde(with = "crate::pathser::vec")]` for `Vec<PathBuf>`.
pub mod vec {
    use super::*;
    use serde::ser::SerializeSeq;

    /// Serialize a list of paths.
    pub fn serialize<S: Serializer>(v: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for p in v {
            seq.serialize_element(&encode(p))?;
        }
        seq.end()
    }

    /// Deserialize a list of paths.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        v.iter()
            .map(|s| decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_paths_stay_readable() {
        let p = Path::new("/data/ckpt é/r 0.h5");
        assert_eq!(encode(p), "/data/ckpt é/r 0.h5");
        assert_eq!(decode(&encode(p)).unwrap(), p);
    }

    #[test]
    fn non_utf8_paths_round_trip() {
        let p = PathBuf::from(OsString::from_vec(vec![b'/', b'a', 0xff, 0xfe, b'z']));
        let e = encode(&p);
        assert!(e.starts_with(HEX_TAG));
        assert_eq!(decode(&e).unwrap(), p);
    }

    #[test]
    fn bad_hex_is_rejected() {
        assert!(decode("\u{0}hex:abc").is_err());
        assert!(decode("\u{0}hex:zz").is_err());
    }
}
