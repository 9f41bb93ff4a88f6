//! KVTree binary files, the format of AXL's state files (KVTree v1.5, `kvtree_write_file`):
//! a header (magic `0x951fc3f5`, type 1, version 1, file size, flags with the CRC32 bit; all
//! big-endian), the packed tree (a count, then per element its NUL-terminated key and its
//! subtree) and a zlib CRC32 of everything before it. A `key = value` pair is the key with a
//! subtree holding one key, the value.
//!
//! ferry writes its AXL state files in this format, with AXL's keys, so a program linked with
//! the original AXL (SCR's `scr_flush_file`) can read them.

const MAGIC: u32 = 0x951f_c3f5;
const TYPE_HASH: u16 = 1;
const VERSION_1: u16 = 1;
const FLAG_CRC32: u32 = 0x1;
const HEADER: usize = 4 + 2 + 2 + 8 + 4;

/// A tree of byte-string keys, in insertion order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tree(pub Vec<(Vec<u8>, Tree)>);

impl Tree {
    /// The subtree under `key`, if any.
    pub fn sub(&self, key: &str) -> Option<&Tree> {
        self.0
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, t)| t)
    }

    /// The subtree under `key`, made if absent.
    pub fn sub_mut(&mut self, key: &[u8]) -> &mut Tree {
        match self.0.iter().position(|(k, _)| k == key) {
            Some(i) => &mut self.0[i].1,
            None => {
                self.0.push((key.to_vec(), Tree::default()));
                &mut self.0.last_mut().expect("just pushed").1
            }
        }
    }

    /// `key = value` (replacing an earlier value).
    pub fn set(&mut self, key: &str, value: impl AsRef<[u8]>) {
        self.set_bytes(key.as_bytes(), value.as_ref());
    }

    pub fn set_bytes(&mut self, key: &[u8], value: &[u8]) {
        *self.sub_mut(key) = Tree(vec![(value.to_vec(), Tree::default())]);
    }

    /// The value of `key`: the first key of its subtree.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.sub(key)?.0.first().map(|(v, _)| v.as_slice())
    }

    /// The value of `key` as a decimal integer.
    pub fn get_int(&self, key: &str) -> Option<i64> {
        std::str::from_utf8(self.get(key)?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn pack(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (k, t) in &self.0 {
            out.extend_from_slice(k);
            out.push(0);
            t.pack(out);
        }
    }

    /// The whole file: header, tree, CRC.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        self.pack(&mut body);
        let size = (HEADER + body.len() + 4) as u64;
        let mut out = Vec::with_capacity(size as usize);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&TYPE_HASH.to_be_bytes());
        out.extend_from_slice(&VERSION_1.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&FLAG_CRC32.to_be_bytes());
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Parse a whole file; what is wrong with it otherwise.
    pub fn from_file_bytes(b: &[u8]) -> Result<Tree, String> {
        if b.len() < HEADER {
            return Err(format!(
                "{} bytes: shorter than a KVTree header (truncated or not a state file)",
                b.len()
            ));
        }
        let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        if be32(0) != MAGIC {
            return Err("not a KVTree file (bad magic number)".into());
        }
        let (ty, ver) = (
            u16::from_be_bytes([b[4], b[5]]),
            u16::from_be_bytes([b[6], b[7]]),
        );
        if ty != TYPE_HASH || ver != VERSION_1 {
            return Err(format!("KVTree file of type {ty} version {ver}, not 1/1"));
        }
        let size = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
        if size != b.len() as u64 {
            return Err(format!(
                "its header says {size} bytes but it has {} (truncated or overwritten)",
                b.len()
            ));
        }
        let flags = be32(16);
        let end = if flags & FLAG_CRC32 != 0 {
            if b.len() < HEADER + 4 {
                return Err("too short for its checksum".into());
            }
            let at = b.len() - 4;
            if crc32fast::hash(&b[..at]) != be32(at) {
                return Err("checksum mismatch (corrupt)".into());
            }
            at
        } else {
            b.len()
        };
        let mut pos = HEADER;
        let t = unpack(&b[..end], &mut pos, 0)?;
        if pos != end {
            return Err("trailing bytes after the tree".into());
        }
        Ok(t)
    }
}

fn unpack(b: &[u8], pos: &mut usize, depth: usize) -> Result<Tree, String> {
    let bad = || "the tree is cut short (corrupt)".to_string();
    if depth > 64 {
        return Err("the tree nests too deeply (corrupt)".into());
    }
    let n = b.get(*pos..*pos + 4).ok_or_else(bad)?;
    let n = u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize;
    *pos += 4;
    // Each element takes at least 5 bytes: a bound on a corrupt count.
    if n > (b.len() - *pos) / 5 {
        return Err(bad());
    }
    let mut t = Tree(Vec::with_capacity(n));
    for _ in 0..n {
        let len = b[*pos..].iter().position(|&c| c == 0).ok_or_else(bad)?;
        let key = b[*pos..*pos + len].to_vec();
        *pos += len + 1;
        let sub = unpack(b, pos, depth + 1)?;
        t.0.push((key, sub));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::default();
        t.set("TYPE", "7");
        t.set("NAME", "ckpt.3");
        let f = t.sub_mut(b"FILE").sub_mut(b"/cache/rank0/a.h5");
        f.set("DEST", "/pfs/ckpt.3/a.h5");
        f.set("STATUS", "1");
        t
    }

    #[test]
    fn round_trips_and_reads_values() {
        let t = sample();
        let b = t.to_file_bytes();
        assert_eq!(&b[..4], &[0x95, 0x1f, 0xc3, 0xf5]);
        let back = Tree::from_file_bytes(&b).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.get_int("TYPE"), Some(7));
        let f = back.sub("FILE").unwrap().sub("/cache/rank0/a.h5").unwrap();
        assert_eq!(f.get("DEST"), Some(&b"/pfs/ckpt.3/a.h5"[..]));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let b = sample().to_file_bytes();
        for n in 0..b.len() {
            assert!(Tree::from_file_bytes(&b[..n]).is_err(), "cut at {n}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(Tree::from_file_bytes(&c).is_err(), "flip at {i}");
        }
    }
}
