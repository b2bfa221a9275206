//! The VM's root file system: a `newc` cpio archive (what the kernel unpacks
//! as its initramfs) of busybox, host binaries with their shared libraries,
//! and the files under test.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write as _},
    path::Path,
    process::Command,
};

use anyhow::Context as _;

/// Files by their path inside the VM (no leading `/`).
#[derive(Clone, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

#[derive(Clone)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
}

impl Initramfs {
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry::Dir);
        }
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let path = path.trim_matches('/').to_owned();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path, Entry::File { data, mode });
    }

    /// Adds the host executable `host` at `path`, and the shared libraries it
    /// loads (and the dynamic loader) at their host paths.
    pub fn executable(&mut self, path: &str, host: &Path) -> anyhow::Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.file(path, data, 0o755);
        for library in shared_libraries(host)? {
            if !self.entries.contains_key(library.trim_start_matches('/')) {
                let data = fs::read(&library).with_context(|| format!("reading {library}"))?;
                self.file(&library, data, 0o755);
            }
        }
        Ok(())
    }

    /// Writes the archive (uncompressed: the kernel unpacks it as fast as it reads).
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        let mut w = BufWriter::new(
            fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
        );
        for (ino, (name, entry)) in (1u32..).zip(&self.entries) {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir => (0o040_755, &[]),
                Entry::File { data, mode } => (0o100_000 | mode, data),
            };
            header(&mut w, ino, mode, data.len(), name)?;
            w.write_all(data)?;
            pad(&mut w, data.len())?;
        }
        header(&mut w, 0, 0, 0, "TRAILER!!!")?;
        w.flush()?;
        Ok(())
    }
}

/// One `newc` header and the entry's name, padded to 4 bytes.
fn header(
    w: &mut impl std::io::Write,
    ino: u32,
    mode: u32,
    size: usize,
    name: &str,
) -> anyhow::Result<()> {
    let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
    let size = u32::try_from(size).context("file too large for newc")?;
    let name_len = u32::try_from(name.len() + 1).context("name too long")?;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
        0, 0, 0, 0, 0, 0, 0, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + name.len() + 1)
}

fn pad(w: &mut impl std::io::Write, len: usize) -> anyhow::Result<()> {
    let fill = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..fill])?;
    Ok(())
}

/// The absolute paths of the libraries `ldd` says `binary` loads; none for a
/// static binary.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::ensure!(
            text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable"),
            "ldd {} failed",
            binary.display()
        );
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = line
            .split_once("=> ")
            .map_or(line.trim(), |(_, p)| p)
            .split(" (")
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            libraries.push(path.to_owned());
        } else if line.contains("not found") {
            anyhow::bail!("{}: {}", binary.display(), line.trim());
        }
    }
    Ok(libraries)
}
