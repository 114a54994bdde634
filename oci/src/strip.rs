//! Copies of ELF files without their DWARF sections and symbol table, for binaries the image
//! carries.
//!
//! A release cohort is ~170 MB, of which ~130 MB is `.debug_*` (the workspace keeps line tables
//! for host backtraces) and several more the static symbol table; in the image that would be
//! most of everything but codex. A panic inside a container still prints its message and
//! source location (those are in the program's data); only backtraces lose function names.
//! The dynamic symbol table, which the loader needs, stays. Done in-process with `object`'s ELF
//! rewriter (no `strip`/`objcopy` on the host needed).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};

/// `data` without its `.debug_*` sections and static symbol table, or `None` when it has
/// neither (or is not ELF).
pub fn strip_debug(data: &[u8]) -> Result<Option<Vec<u8>>> {
    let bad = |reason: String| Error::Elf {
        path: PathBuf::from("<strip>"),
        reason,
    };
    if object::FileKind::parse(data).ok() != Some(object::FileKind::Elf64)
        && object::FileKind::parse(data).ok() != Some(object::FileKind::Elf32)
    {
        return Ok(None);
    }
    let mut b = object::build::elf::Builder::read(data).map_err(|e| bad(e.to_string()))?;
    let mut any = false;
    use object::build::elf::SectionData;
    for s in b.sections.iter_mut() {
        let symbols = matches!(
            s.data,
            SectionData::Symbol | SectionData::SymbolSectionIndex | SectionData::String
        );
        if symbols || s.name.starts_with(b".debug_") || s.name.starts_with(b".zdebug_") {
            s.delete = true;
            any = true;
        }
    }
    for sym in b.symbols.iter_mut() {
        sym.delete = true;
    }
    if !any {
        return Ok(None);
    }
    b.delete_orphans();
    let mut out = Vec::with_capacity(data.len() / 3);
    b.write(&mut out).map_err(|e| bad(e.to_string()))?;
    Ok(Some(out))
}

/// A stripped copy of `host` in `cache_dir`, or `host` itself when there is nothing to strip.
///
/// The copy is named after `host`'s path, device, inode, size and mtime and kept: the next build
/// of an unchanged binary finds it without reading the original, and because the copy's own
/// inode and mtime stay the same, the layer holding it keeps its fingerprint and is reused
/// rather than compressed again.
pub fn stripped_copy(host: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(host).at(host)?;
    let key = format!(
        "v2\0{}\0{} {} {} {}.{}",
        host.display(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let name = hex::encode(&Sha256::digest(key.as_bytes())[..16]);
    let out = cache_dir.join(&name);
    let same = cache_dir.join(format!("{name}.unchanged"));
    if out.is_file() {
        return Ok(out);
    }
    if same.is_file() {
        return Ok(host.to_owned());
    }
    fs::create_dir_all(cache_dir).at(cache_dir)?;
    let data = fs::read(host).at(host)?;
    let stripped = strip_debug(&data).map_err(|e| match e {
        Error::Elf { reason, .. } => Error::Elf {
            path: host.to_owned(),
            reason,
        },
        e => e,
    })?;
    match stripped {
        Some(bytes) => {
            let tmp = cache_dir.join(format!(".{name}.{}", std::process::id()));
            fs::write(&tmp, bytes).at(&tmp)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o777)).at(&tmp)?;
            fs::rename(&tmp, &out).at(&out)?;
            Ok(out)
        }
        None => {
            fs::write(&same, b"").at(&same)?;
            Ok(host.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself has DWARF (dev profile): its stripped copy is smaller, has no
    /// `.debug_*` section or static symbol table left, and still runs.
    #[test]
    fn stripped_test_binary_runs() {
        use object::{Object, ObjectSection};
        let me = std::env::current_exe().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let copy = stripped_copy(&me, tmp.path()).unwrap();
        assert_ne!(copy, me, "the test binary has debug sections");
        let (a, b) = (fs::read(&me).unwrap(), fs::read(&copy).unwrap());
        assert!(b.len() < a.len());
        let obj = object::File::parse(&*b).unwrap();
        assert!(obj.sections().all(|s| !s.name().unwrap_or("").starts_with(".debug_")));
        assert!(obj.symbol_table().is_none(), "the static symbol table is left");
        assert!(obj.dynamic_symbol_table().is_some(), "the loader's symbols are gone");
        // Cached: the same path again, without rewriting it.
        let mtime = fs::metadata(&copy).unwrap().modified().unwrap();
        assert_eq!(stripped_copy(&me, tmp.path()).unwrap(), copy);
        assert_eq!(fs::metadata(&copy).unwrap().modified().unwrap(), mtime);
        let out = std::process::Command::new(&copy).arg("--list").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("stripped_test_binary_runs"));
    }

    #[test]
    fn non_elf_is_left_alone() {
        assert_eq!(strip_debug(b"#!/bin/sh\necho hi\n").unwrap(), None);
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("s");
        fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(stripped_copy(&script, &tmp.path().join("c")).unwrap(), script);
    }
}
