//! `cargo xtask package`: the Debian package, built with `dpkg-deb` from a
//! release build and the files under `packaging/`; and its check, which
//! `cargo xtask test` runs: lintian, then an install on this machine, the
//! installed binary run with the installed config, the man page rendered, a
//! completion script loaded, and a removal and purge that leave nothing.

use std::{
    fs,
    io::Write as _,
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{cmd, setup};

/// The package's name: `limiter_<version>_<arch>.deb`.
const NAME: &str = "limiter";
/// Where the package goes, below the workspace's `target/`.
const OUT_DIR: &str = "target/package";
/// Docs shipped under `/usr/share/doc/limiter/`.
const DOCS: &[&str] = &[
    "README.md",
    "docs/architecture.md",
    "docs/configuration.md",
    "docs/envoy.md",
    "docs/operating.md",
    "docs/robustness.md",
    "docs/security.md",
    "docs/testing.md",
    "docs/xdp.md",
];

#[derive(clap::Args)]
pub struct Options {
    /// Build the package, then check it: lintian, install, run, remove, purge
    /// (root; changes this machine's package database while it runs).
    #[arg(long)]
    pub check: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let deb = build("release")?;
    println!("{}", deb.display());
    if options.check {
        check(&deb)?;
    }
    Ok(())
}

/// One file of the package: its path on the host, its mode, its content.
struct Entry {
    path: String,
    mode: u32,
    content: Vec<u8>,
}

/// Builds the package from a build in `profile` (`release`, what is
/// shipped; the test command's check uses its `smoke` build, the same code
/// without the LTO link); returns its path.
pub fn build(profile: &str) -> anyhow::Result<PathBuf> {
    setup::ensure_apt(&["dpkg-dev", "binutils", "gzip"])?;
    let root = cmd::workspace_root();
    cmd::run(cmd::cargo().args(["build", "--profile", profile, "--package", "limiter-agent"]))?;
    let binary = root.join("target").join(profile).join("limiter-agent");
    let version = env!("CARGO_PKG_VERSION");
    let arch = cmd::output(Command::new("dpkg").arg("--print-architecture"))
        .map(|a| a.trim().to_owned())
        .context("dpkg --print-architecture")?;

    let stage = root.join(OUT_DIR).join("root");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let stripped = root.join(OUT_DIR).join("limiter-agent");
    fs::create_dir_all(root.join(OUT_DIR))?;
    cmd::run(
        Command::new("objcopy")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(&binary)
            .arg(&stripped),
    )?;

    let entries = files(&root, &binary, &stripped)?;
    for entry in &entries {
        let path = stage.join(&entry.path);
        fs::create_dir_all(path.parent().expect("a parent"))?;
        fs::write(&path, &entry.content)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(entry.mode))?;
    }
    // Directories 0755 all the way down (the build's umask may differ).
    for dir in walk_dirs(&stage)? {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    }

    control(&stage, &entries, &depends(&stripped)?, arch.as_str())?;

    let deb = root
        .join(OUT_DIR)
        .join(format!("{NAME}_{version}_{arch}.deb"));
    // File times clamped to the changelog's date: the same tree gives the
    // same package.
    let released = cmd::output(
        Command::new("dpkg-parsechangelog")
            .args(["-l", "packaging/debian/changelog", "-S", "Timestamp"])
            .current_dir(&root),
    )
    .map(|t| t.trim().to_owned())
    .context("dpkg-parsechangelog")?;
    cmd::run(
        Command::new("dpkg-deb")
            .env("SOURCE_DATE_EPOCH", released)
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Every file the package installs, with its mode and content.
fn files(root: &Path, binary: &Path, stripped: &Path) -> anyhow::Result<Vec<Entry>> {
    let generate = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let output = Command::new(binary)
            .arg("generate")
            .args(args)
            .output()
            .context("running limiter-agent generate")?;
        ensure!(
            output.status.success(),
            "limiter-agent generate {args:?} failed"
        );
        Ok(output.stdout)
    };
    let read = |path: &str| fs::read(root.join(path)).with_context(|| format!("reading {path}"));

    let mut entries = vec![
        Entry {
            path: "usr/sbin/limiter-agent".into(),
            mode: 0o755,
            content: fs::read(stripped)?,
        },
        Entry {
            path: "usr/lib/systemd/system/limiter-agent.service".into(),
            mode: 0o644,
            content: read("packaging/limiter-agent.service")?,
        },
        Entry {
            path: "etc/limiter/limiter.toml".into(),
            mode: 0o640,
            content: conffile(&read("examples/concurred.toml")?),
        },
        Entry {
            path: "usr/share/bash-completion/completions/limiter-agent".into(),
            mode: 0o644,
            content: generate(&["completion", "bash"])?,
        },
        Entry {
            path: "usr/share/zsh/vendor-completions/_limiter-agent".into(),
            mode: 0o644,
            content: generate(&["completion", "zsh"])?,
        },
        Entry {
            path: "usr/share/fish/vendor_completions.d/limiter-agent.fish".into(),
            mode: 0o644,
            content: generate(&["completion", "fish"])?,
        },
        Entry {
            path: "usr/share/doc/limiter/copyright".into(),
            mode: 0o644,
            content: read("packaging/debian/copyright")?,
        },
        Entry {
            path: "usr/share/lintian/overrides/limiter".into(),
            mode: 0o644,
            content: read("packaging/debian/lintian-overrides")?,
        },
        Entry {
            path: "usr/share/doc/limiter/changelog.gz".into(),
            mode: 0o644,
            content: gzip(&read("packaging/debian/changelog")?)?,
        },
    ];
    // limiter-agent(8) and a page per subcommand, which it refers to.
    let pages = root.join(OUT_DIR).join("man");
    if pages.exists() {
        fs::remove_dir_all(&pages)?;
    }
    fs::create_dir_all(&pages)?;
    let written = generate(&["man", "--dir", &pages.to_string_lossy()])?;
    for page in String::from_utf8(written)?.lines() {
        entries.push(Entry {
            path: format!("usr/share/man/man8/{page}.gz"),
            mode: 0o644,
            content: gzip(&fs::read(pages.join(page))?)?,
        });
    }
    for doc in DOCS {
        let name = Path::new(doc).file_name().expect("a file name");
        let path = format!("usr/share/doc/limiter/{}", name.to_string_lossy());
        entries.push(Entry {
            path,
            mode: 0o644,
            content: read(doc)?,
        });
    }
    Ok(entries)
}

/// The package's `DEBIAN/` directory: control, conffiles, maintainer scripts.
fn control(stage: &Path, entries: &[Entry], depends: &str, arch: &str) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let control = stage.join("DEBIAN");
    fs::create_dir_all(&control)?;
    fs::set_permissions(&control, fs::Permissions::from_mode(0o755))?;
    let installed_kib: u64 = entries.iter().map(|e| e.content.len() as u64).sum::<u64>() / 1024 + 1;
    fs::write(
        control.join("control"),
        format!(
            "Package: {NAME}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: limiter developers <limiter@example.org>\n\
             Installed-Size: {installed_kib}\n\
             Depends: {depends}\n\
             Section: net\n\
             Priority: optional\n\
             Description: XDP-accelerated rate limiter for HTTP APIs\n \
             limiter-agent is a reverse proxy in front of an HTTP API that enforces\n \
             exact per-endpoint rate limits per client, tells every client where it\n \
             stands (X-RateLimit-* headers, a JSON 429), and drops floods and banned\n \
             sources in the kernel with an XDP program before they cost anything.\n"
        ),
    )?;
    fs::write(control.join("conffiles"), "/etc/limiter/limiter.toml\n")?;
    // Every file but the conffile (dpkg keeps its own sums of those).
    let mut sums = Vec::new();
    for entry in entries.iter().filter(|e| !e.path.starts_with("etc/")) {
        let output = Command::new("md5sum")
            .arg(&entry.path)
            .current_dir(stage)
            .output()
            .context("running md5sum")?;
        ensure!(output.status.success(), "md5sum {} failed", entry.path);
        sums.extend_from_slice(&output.stdout);
    }
    fs::write(control.join("md5sums"), sums)?;
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        fs::copy(root.join("packaging/debian").join(script), &path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    for file in ["control", "conffiles", "md5sums"] {
        fs::set_permissions(control.join(file), fs::Permissions::from_mode(0o644))?;
    }

    Ok(())
}

/// The installed config: the reference tier table, with a header saying what
/// to edit. The demo upstream is a command-line flag, so the unit, which does
/// not pass it, runs without it.
fn conffile(reference: &[u8]) -> Vec<u8> {
    let mut out = b"# limiter-agent's config, installed by the limiter package and kept across\n\
# upgrades. Point [server] upstream at the API this host serves (the address\n\
# below is a placeholder), set [xdp] interfaces to the host's uplinks, then\n\
# `limiter-agent check-config /etc/limiter/limiter.toml` and\n\
# `systemctl reload limiter-agent` (or start it). Every key:\n\
# /usr/share/doc/limiter/configuration.md\n\n"
        .to_vec();
    out.extend_from_slice(reference);
    out
}

/// `gzip -9n`: no name or time stamp in the header, so builds are reproducible.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    child.stdin.take().expect("piped").write_all(data)?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "gzip failed");
    Ok(output.stdout)
}

/// The shared libraries the binary links, as Debian dependencies
/// (`dpkg-shlibdeps`, which wants a `debian/control` beside it).
fn depends(binary: &Path) -> anyhow::Result<String> {
    let dir = binary.parent().expect("a parent").join("shlibdeps");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"),
    )?;
    let output = Command::new("dpkg-shlibdeps")
        .args(["-O", "-e"])
        .arg(binary)
        .current_dir(&dir)
        .stderr(Stdio::inherit())
        .output()
        .context("running dpkg-shlibdeps (package dpkg-dev)")?;
    ensure!(output.status.success(), "dpkg-shlibdeps failed");
    let text = String::from_utf8(output.stdout)?;
    text.lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .context("dpkg-shlibdeps printed no dependencies")
}

fn walk_dirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk_dirs(&path)?);
        }
    }
    Ok(out)
}

/// Checks `deb` on this machine: lintian, install, run, man page, completion,
/// removal and purge. Fails if anything it installed is left behind.
pub fn check(deb: &Path) -> anyhow::Result<()> {
    setup::ensure_apt(&["lintian", "man-db", "curl"])?;
    ensure!(
        cmd::is_root(),
        "the package check installs a package: run it as root"
    );
    let already = Command::new("dpkg")
        .args(["-s", NAME])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(
        !already.success(),
        "package {NAME} is already installed here; remove it first"
    );

    // Lintian: errors fail the check; warnings are shown.
    let lintian = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    print!("{}", String::from_utf8_lossy(&lintian.stdout));
    ensure!(
        lintian.status.success(),
        "lintian found errors in {}",
        deb.display()
    );
    let size = fs::metadata(deb)?.len();
    println!("package: {} ({size} bytes)", deb.display());

    let files = contents(deb)?;
    let installed = cmd::run(Command::new("dpkg").arg("-i").arg(deb))
        .and_then(|()| exercise())
        .and_then(|()| upgrade(deb));
    // Removed whatever happened, so a failed check leaves the machine as it was.
    let removed = cmd::run(Command::new("dpkg").args(["-r", NAME]));
    let kept = Path::new("/etc/limiter/limiter.toml").exists();
    // Pins of two instances: one whose agent runs (this process stands in
    // for it) must survive the purge, one no agent holds must go.
    let pins = Path::new("/sys/fs/bpf/limiter");
    let (stale, live) = (
        pins.join("package-check-stale"),
        pins.join("package-check-live"),
    );
    let live_state = Path::new("/run/limiter/package-check-live.json");
    fs::create_dir_all(&stale)?;
    fs::create_dir_all(&live)?;
    fs::create_dir_all("/run/limiter")?;
    fs::write(
        live_state,
        format!("{{\n  \"pid\": {}\n}}\n", std::process::id()),
    )?;
    let purged = cmd::run(Command::new("dpkg").args(["--purge", NAME]));
    let pins_right = !stale.exists() && live.exists();
    let _ = fs::remove_dir(&live);
    let _ = fs::remove_file(live_state);
    let _ = fs::remove_dir(pins);
    let _ = fs::remove_dir("/run/limiter");
    installed?;
    removed?;
    purged?;
    ensure!(
        kept,
        "dpkg -r removed /etc/limiter/limiter.toml; only a purge may"
    );
    ensure!(
        pins_right,
        "the purge must remove the pins no agent holds and keep a running agent's"
    );
    let left: Vec<&String> = files
        .iter()
        .filter(|f| Path::new(f).symlink_metadata().is_ok() && !is_shared_dir(f))
        .collect();
    ensure!(left.is_empty(), "left behind after the purge: {left:?}");
    let known = Command::new("dpkg")
        .args(["-s", NAME])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(!known.success(), "dpkg still knows {NAME} after the purge");
    for path in [
        "/etc/limiter",
        "/etc/systemd/system/multi-user.target.wants/limiter-agent.service",
        "/etc/systemd/system/limiter-agent.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/limiter-agent.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/limiter-agent.service",
        "/var/lib/systemd/deb-systemd-helper-masked/limiter-agent.service",
    ] {
        ensure!(
            Path::new(path).symlink_metadata().is_err(),
            "left behind after the purge: {path}"
        );
    }
    println!("package check: passed");
    Ok(())
}

/// The installed package, used as an operator would.
fn exercise() -> anyhow::Result<()> {
    let agent = "/usr/sbin/limiter-agent";
    let config = "/etc/limiter/limiter.toml";
    ensure!(
        Path::new("/etc/systemd/system/multi-user.target.wants/limiter-agent.service").exists(),
        "the unit is not enabled after install"
    );
    cmd::run(Command::new(agent).args(["check-config", config]))?;
    // The unit as installed: its paths exist, its directives are known.
    cmd::run(
        Command::new("systemd-analyze")
            .args(["verify", "/usr/lib/systemd/system/limiter-agent.service"]),
    )?;

    // Run with the installed config on free ports, in front of the demo
    // upstream, without XDP (nothing attached, nothing pinned).
    // Both ports held until the agent starts, so they differ.
    let (listen, admin) = (
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    );
    let (listen_port, admin_port) = (listen.local_addr()?.port(), admin.local_addr()?.port());
    drop((listen, admin));
    let (listen, admin) = (listen_port, admin_port);
    let mut child = Command::new(agent)
        .args(["run", "--config", config, "--demo-upstream", "--no-xdp"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the installed agent")?;
    let url = format!("http://127.0.0.1:{listen}/api/v1/chat/completions");
    let answer = (|| -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(head) =
                cmd::output(Command::new("curl").args(["-sS", "-i", "--max-time", "2", &url]))
            {
                return Ok(head);
            }
            if Instant::now() > deadline {
                bail!("the installed agent did not answer on port {listen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    // The answer must be the installed agent's: it is still running.
    let running = child.try_wait()?.is_none();
    let _ = child.kill();
    let _ = child.wait();
    let answer = answer?.to_ascii_lowercase();
    ensure!(
        running,
        "the installed agent exited; the answer on port {listen} was not its own"
    );
    for header in [
        "x-ratelimit-limit: 60",
        "x-ratelimit-remaining: 59",
        "x-ratelimit-reset: ",
    ] {
        ensure!(
            answer.contains(header),
            "no `{header}` in the installed agent's answer:\n{answer}"
        );
    }
    println!(
        "installed agent answered: {}",
        answer
            .lines()
            .filter(|l| l.starts_with("http/") || l.starts_with("x-ratelimit-"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The man page renders.
    let man = Command::new("man")
        .args(["-l", "/usr/share/man/man8/limiter-agent.8.gz"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
        .context("running man")?;
    let page = String::from_utf8_lossy(&man.stdout);
    ensure!(
        man.status.success() && page.contains("check-config"),
        "man -l did not render the page"
    );

    // The bash completion script loads and completes the subcommands.
    let completion = Command::new("bash")
        .args([
            "-c",
            "source /usr/share/bash-completion/completions/limiter-agent \
             && f=$(complete -p limiter-agent | sed -E 's/.* -F ([^ ]+) .*/\\1/') \
             && COMP_WORDS=(limiter-agent che) && COMP_CWORD=1 \
             && COMP_LINE='limiter-agent che' && COMP_POINT=17 \
             && \"$f\" limiter-agent che limiter-agent \
             && printf '%s\\n' \"${COMPREPLY[@]}\"",
        ])
        .output()
        .context("running bash")?;
    let completed = String::from_utf8_lossy(&completion.stdout);
    ensure!(
        completion.status.success() && completed.contains("check-config"),
        "the bash completion did not load or complete: {completed}{}",
        String::from_utf8_lossy(&completion.stderr)
    );
    Ok(())
}

/// The same package installed over itself, as an upgrade is: the operator's
/// edit of the config stays, and so does the unit's enablement.
fn upgrade(deb: &Path) -> anyhow::Result<()> {
    let config = Path::new("/etc/limiter/limiter.toml");
    let edit = "\n# an operator's edit, kept across upgrades\n";
    let mut edited = fs::read_to_string(config)?;
    edited.push_str(edit);
    fs::write(config, &edited)?;
    cmd::run(
        Command::new("dpkg")
            .args(["-i", "--force-confold"])
            .arg(deb),
    )?;
    ensure!(
        fs::read_to_string(config)?.contains(edit),
        "reinstalling the package replaced the operator's config"
    );
    ensure!(
        Path::new("/etc/systemd/system/multi-user.target.wants/limiter-agent.service").exists(),
        "the unit is no longer enabled after the upgrade"
    );
    Ok(())
}

/// The files and directories the package holds, as absolute paths.
fn contents(deb: &Path) -> anyhow::Result<Vec<String>> {
    let listing =
        cmd::output(Command::new("dpkg-deb").arg("-c").arg(deb)).context("dpkg-deb -c")?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_owned())
        .filter(|p| !p.is_empty())
        .collect())
}

/// Directories other packages own too (`/usr`, `/usr/share/man/man8`…): the
/// purge leaves them, and rightly.
fn is_shared_dir(path: &str) -> bool {
    Path::new(path).is_dir() && !path.contains("limiter")
}
