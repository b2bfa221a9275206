//! The kernels of the matrix: Debian's cloud kernels, fetched with apt from a
//! private state directory (the machine's own sources stay untouched) and
//! unpacked under `target/vm/<suite>/`, where later runs find them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// A kernel of the matrix: the cloud kernel of one Debian release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The upstream series, as users name it (`6.1`).
    pub name: &'static str,
    /// The Debian release that ships it.
    pub suite: &'static str,
}

/// Every supported kernel, oldest first: the default set.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        suite: "bullseye",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
    },
];

impl Kernel {
    /// The kernel called `name`: its series (`6.1`) or its Debian release (`bookworm`).
    pub fn named(name: &str) -> anyhow::Result<Self> {
        KERNELS
            .into_iter()
            .find(|k| k.name == name || k.suite == name)
            .with_context(|| {
                let known: Vec<String> = KERNELS
                    .iter()
                    .map(|k| format!("{} ({})", k.name, k.suite))
                    .collect();
                format!("unknown kernel `{name}`; known: {}", known.join(", "))
            })
    }
}

/// The unpacked kernel package.
#[derive(Debug)]
pub struct Unpacked {
    /// The Debian package and its version (`linux-image-6.1.0-56-cloud-amd64 6.1.192-2`).
    pub package: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the package.
    pub modules: PathBuf,
}

const METAPACKAGE: &str = "linux-image-cloud-amd64";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The kernel's package, unpacked: from the cache under `dir` unless `refresh`
/// or absent, else the version the suite's metapackage points at today.
pub fn fetch(kernel: Kernel, dir: &Path, refresh: bool) -> anyhow::Result<Unpacked> {
    let root = dir.join("root");
    let stamp = dir.join("package");
    if !refresh
        && let Ok(package) = fs::read_to_string(&stamp)
        && let Ok(unpacked) = locate(&root, package.trim())
    {
        return Ok(unpacked);
    }
    let apt = AptState::create(&dir.join("apt"), kernel.suite)?;
    cmd::run(apt.command("apt-get").args(["-q", "update"]))
        .with_context(|| format!("apt-get update for {}", kernel.suite))?;
    let (name, version) = apt.resolve(METAPACKAGE)?;
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    cmd::run(
        apt.command("apt-get")
            .args(["-q", "download", &format!("{name}={version}")])
            .current_dir(&debs),
    )?;
    let deb = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&format!("{name}_")))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {name} package in {}",
                debs.display()
            )
        })?;
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let package = format!("{name} {version}");
    let unpacked = locate(&root, &package)?;
    fs::write(&stamp, &package)?;
    Ok(unpacked)
}

/// The kernel image and module tree of an unpacked package.
fn locate(root: &Path, package: &str) -> anyhow::Result<Unpacked> {
    let vmlinuz = fs::read_dir(root.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", root.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("vmlinuz-"))
        .context("kernel file name")?;
    // Packages since trixie install under /usr/lib (merged /usr).
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|base| root.join(base).join(release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no modules of {release} in {}", root.display()))?;
    Ok(Unpacked {
        package: package.to_owned(),
        vmlinuz,
        modules,
    })
}

/// apt pointed at one Debian release with its own lists, cache and status.
struct AptState {
    options: Vec<(String, PathBuf)>,
}

impl AptState {
    fn create(dir: &Path, suite: &str) -> anyhow::Result<Self> {
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "parts",
            "sources.list.d",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={KEYRING}] http://deb.debian.org/debian {suite} main\n\
                 deb [signed-by={KEYRING}] http://deb.debian.org/debian-security {suite}-security main\n"
            ),
        )?;
        // An empty dpkg status: nothing is installed as far as this apt knows.
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let options = vec![
            ("Dir::State".into(), dir.to_path_buf()),
            ("Dir::State::Lists".into(), dir.join("lists")),
            ("Dir::State::status".into(), status),
            ("Dir::Cache".into(), dir.join("cache")),
            ("Dir::Etc::sourcelist".into(), sources),
            ("Dir::Etc::sourceparts".into(), dir.join("sources.list.d")),
            ("Dir::Etc::parts".into(), dir.join("parts")),
            ("Dir::Etc::preferencesparts".into(), dir.join("parts")),
        ];
        Ok(Self { options })
    }

    fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(tool);
        for (key, path) in &self.options {
            command.arg("-o").arg(format!("{key}={}", path.display()));
        }
        command.args([
            "-o",
            "Acquire::Languages=none",
            "-o",
            "APT::Sandbox::User=root",
        ]);
        command
    }

    /// The package and exact version `metapackage` depends on in this release.
    fn resolve(&self, metapackage: &str) -> anyhow::Result<(String, String)> {
        let shown =
            cmd::output(
                self.command("apt-cache")
                    .args(["show", "--no-all-versions", metapackage]),
            )
            .with_context(|| format!("apt-cache show {metapackage}"))?;
        let depends = shown
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .with_context(|| format!("{metapackage} has no Depends"))?;
        // `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2), …`
        let first = depends.split(',').next().unwrap_or_default().trim();
        let Some((name, version)) = first
            .split_once(" (= ")
            .and_then(|(n, v)| Some((n, v.strip_suffix(')')?)))
        else {
            bail!("unexpected dependency `{first}` of {metapackage}");
        };
        Ok((name.to_owned(), version.to_owned()))
    }
}

/// The modules `wanted` (by name) and everything they depend on, in load
/// order, decompressed: Debian's cloud kernels build veth as a module, and
/// busybox `insmod` reads neither `.ko.xz` nor `modules.dep` (which the
/// package does not ship: depmod writes it at install).
pub fn modules(tree: &Path, wanted: &[&str]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    walk(tree, &mut files)?;
    let mut loaded: Vec<(String, Vec<u8>)> = Vec::new();
    let mut stack: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|m| ((*m).to_owned(), false))
        .collect();
    while let Some((name, deps_done)) = stack.pop() {
        if loaded.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let file = files
            .iter()
            .find(|p| module_name(p).is_some_and(|n| n == name))
            .with_context(|| format!("no module {name} under {}", tree.display()))?;
        let data = decompress(file)?;
        let depends = modinfo(&data, "depends");
        let missing: Vec<String> = depends
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .filter(|d| !loaded.iter().any(|(n, _)| n == d))
            .collect();
        if deps_done || missing.is_empty() {
            loaded.push((name, data));
        } else {
            stack.push((name, true));
            stack.extend(missing.into_iter().map(|d| (d, false)));
        }
    }
    Ok(loaded)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// `veth` for `…/veth.ko.xz` (module names use `_` where files may use `-`).
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.split_once(".ko")?.0;
    Some(stem.replace('-', "_"))
}

fn decompress(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} on {name}"))?;
    anyhow::ensure!(out.status.success(), "{tool} -d {name} failed");
    Ok(out.stdout)
}

/// A `key=value` field of a module's `.modinfo` section.
fn modinfo(data: &[u8], key: &str) -> String {
    let needle = format!("{key}=");
    data.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(needle.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}
