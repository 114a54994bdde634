//! The shared-library closure of host programs, read from their ELF headers in-process.
//!
//! We deliberately do not run `ldd`: it executes the program's interpreter (unsafe on
//! untrusted binaries) and is a shell-out. Instead we read `PT_INTERP`, `DT_NEEDED`,
//! `DT_RUNPATH`/`DT_RPATH` and search the same directories the dynamic loader would.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::{Endianness, FileKind};

use crate::error::{Error, IoContext, Result};

/// What the dynamic loader needs to start one ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`; `None` for static files and most libraries.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` sonames in file order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH` (or `DT_RPATH`) entries, `$ORIGIN` not yet expanded.
    pub runpath: Vec<String>,
    /// 64-bit class and `e_machine`, so a same-named library of another ABI is skipped.
    pub is_64: bool,
    pub machine: u16,
}

/// Read the dependency information of `path`. `Ok(None)` for files that are not ELF
/// (scripts, data), which need nothing from the loader.
pub fn read_deps(path: &Path) -> Result<Option<ElfDeps>> {
    let data = fs::read(path).at(path)?;
    let bad = |e: object::Error| Error::Elf {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    match FileKind::parse(&*data) {
        Ok(FileKind::Elf64) => parse::<elf::FileHeader64<Endianness>>(&data, true).map_err(bad),
        Ok(FileKind::Elf32) => parse::<elf::FileHeader32<Endianness>>(&data, false).map_err(bad),
        _ => Ok(None),
    }
}

fn parse<H: FileHeader<Endian = Endianness>>(data: &[u8], is_64: bool) -> object::Result<Option<ElfDeps>> {
    let header = H::parse(data)?;
    let endian = header.endian()?;
    let mut deps = ElfDeps {
        interpreter: None,
        needed: Vec::new(),
        runpath: Vec::new(),
        is_64,
        machine: header.e_machine(endian),
    };
    for ph in header.program_headers(endian, data)? {
        if let Some(interp) = ph.interpreter(endian, data)? {
            deps.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let mut rpath = Vec::new();
    if let Some((dyns, link)) = sections.dynamic(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        for d in dyns {
            let Some(tag) = d.tag32(endian) else { continue };
            let text =
                || -> object::Result<String> { Ok(String::from_utf8_lossy(d.string(endian, strings)?).into_owned()) };
            match tag {
                elf::DT_NEEDED => deps.needed.push(text()?),
                elf::DT_RUNPATH => deps.runpath.extend(text()?.split(':').map(str::to_owned)),
                elf::DT_RPATH => rpath.extend(text()?.split(':').map(str::to_owned)),
                _ => {}
            }
        }
    }
    // The loader ignores DT_RPATH when DT_RUNPATH is present.
    if deps.runpath.is_empty() {
        deps.runpath = rpath;
    }
    deps.runpath.retain(|p| !p.is_empty());
    Ok(Some(deps))
}

/// Finds libraries the way `ld.so` does for a default (non-LD_LIBRARY_PATH) start.
/// The host environment is intentionally ignored so that builds are reproducible.
#[derive(Debug, Clone)]
pub struct LibraryResolver {
    dirs: Vec<PathBuf>,
}

impl LibraryResolver {
    /// Directories from `/etc/ld.so.conf` (with its `include`s), then the built-in defaults.
    pub fn system() -> Self {
        let mut dirs = Vec::new();
        read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
        for d in [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib64",
            "/usr/lib64",
            "/lib",
            "/usr/lib",
        ] {
            dirs.push(PathBuf::from(d));
        }
        Self::with_dirs(dirs)
    }

    /// A resolver with exactly these search directories (used by tests and odd hosts).
    pub fn with_dirs(dirs: Vec<PathBuf>) -> Self {
        let mut seen = BTreeSet::new();
        let dirs = dirs.into_iter().filter(|d| seen.insert(d.clone())).collect();
        LibraryResolver { dirs }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The interpreters and libraries (transitively) needed by `roots`, as host paths as
    /// found (not canonicalized: the layer keeps the symlinks the loader will walk).
    /// The roots themselves are not included.
    pub fn closure(&self, roots: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
        let mut out = BTreeSet::new();
        let mut visited = BTreeSet::new();
        let mut queue: VecDeque<PathBuf> = roots.iter().cloned().collect();
        while let Some(file) = queue.pop_front() {
            let canon = fs::canonicalize(&file).at(&file)?;
            if !visited.insert(canon) {
                continue;
            }
            let Some(deps) = read_deps(&file)? else {
                continue;
            };
            if let Some(interp) = &deps.interpreter {
                let p = PathBuf::from(interp);
                if !p.exists() {
                    return Err(Error::Missing(p));
                }
                out.insert(p.clone());
                queue.push_back(p);
            }
            for name in &deps.needed {
                let lib = self.find(name, &file, &deps)?;
                out.insert(lib.clone());
                queue.push_back(lib);
            }
        }
        Ok(out)
    }

    fn find(&self, name: &str, needed_by: &Path, deps: &ElfDeps) -> Result<PathBuf> {
        if name.contains('/') {
            let p = PathBuf::from(name);
            return if p.exists() { Ok(p) } else { Err(Error::Missing(p)) };
        }
        let origin = needed_by.parent().unwrap_or(Path::new("/"));
        let runpath = deps.runpath.iter().map(|r| {
            PathBuf::from(
                r.replace("$ORIGIN", &origin.to_string_lossy())
                    .replace("${ORIGIN}", &origin.to_string_lossy()),
            )
        });
        for dir in runpath.chain(self.dirs.iter().cloned()) {
            let candidate = dir.join(name);
            if !candidate.is_file() {
                continue;
            }
            // A library of another class or machine (e.g. i386 multiarch) is skipped, as ld.so does.
            match read_deps(&candidate) {
                Ok(Some(d)) if d.is_64 == deps.is_64 && d.machine == deps.machine => return Ok(candidate),
                _ => continue,
            }
        }
        Err(Error::LibraryNotFound {
            name: name.to_owned(),
            needed_by: needed_by.to_owned(),
            searched: self
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })
    }
}

fn read_ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    // ld.so.conf is optional and may include itself through globs; stay shallow.
    if depth > 4 {
        return;
    }
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            for file in expand_conf_glob(pattern.trim()) {
                read_ld_so_conf(&file, dirs, depth + 1);
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

/// Only the `DIR/*.conf`-style globs that ld.so.conf uses in practice; sorted like glibc.
fn expand_conf_glob(pattern: &str) -> Vec<PathBuf> {
    let path = Path::new(pattern);
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let file = file.to_string_lossy();
    let Some((prefix, suffix)) = file.split_once('*') else {
        return vec![path.to_owned()];
    };
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(prefix) && n.ends_with(suffix)
                })
                .unwrap_or(false)
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_closure_has_libc_and_interpreter() {
        let r = LibraryResolver::system();
        let deps = read_deps(Path::new("/bin/bash")).unwrap().expect("bash is ELF");
        let interp = deps.interpreter.clone().expect("bash is dynamic");
        assert!(deps.needed.iter().any(|n| n.starts_with("libc.so")));
        let set = r.closure(&[PathBuf::from("/bin/bash")]).unwrap();
        assert!(set.contains(Path::new(&interp)), "{set:?}");
        assert!(
            set.iter()
                .any(|p| p.file_name().unwrap().to_string_lossy().starts_with("libc.so")),
            "{set:?}"
        );
        // bash needs libtinfo on Debian: a transitive-ish check that DT_NEEDED was read.
        assert!(set.iter().all(|p| p.exists()));
    }

    #[test]
    fn scripts_have_no_deps() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.sh");
        fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(read_deps(&f).unwrap(), None);
    }

    #[test]
    fn missing_library_is_a_typed_error() {
        let r = LibraryResolver::with_dirs(vec![PathBuf::from("/nonexistent")]);
        match r.closure(&[PathBuf::from("/bin/bash")]) {
            Err(Error::LibraryNotFound { name, .. }) => assert!(!name.is_empty()),
            other => panic!("expected LibraryNotFound, got {other:?}"),
        }
    }
}
