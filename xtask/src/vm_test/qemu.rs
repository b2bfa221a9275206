//! Booting a kernel and initramfs in qemu with the serial console on stdout,
//! under a hard time limit, and reading the steps the VM reports.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// qemu's accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Emulation: slower per instruction, but boots everywhere (a 6.1 kernel in ~4 s here).
    Tcg,
    /// Hardware virtualisation: fast where /dev/kvm is real, unusable when nested
    /// KVM is emulated (a boot takes minutes on these machines).
    Kvm,
}

/// What the VM said, line by line, and whether it finished.
pub struct Console {
    pub lines: Vec<String>,
    /// Why the VM stopped early: time limit, qemu failure.
    pub stopped: Option<String>,
    pub elapsed: Duration,
}

/// Boots `vmlinuz` with `initrd` and collects the console until the VM powers
/// off or `limit` passes (then qemu is killed). Every line goes to `log`;
/// the `@@` lines (the VM's reports) are echoed as they arrive.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    accel: Accel,
    limit: Duration,
    log: &Path,
) -> anyhow::Result<Console> {
    // Niced: the VM is a test, and the machines it runs on are shared with builds.
    let mut command = Command::new("nice");
    command
        .args([
            "-n",
            "10",
            "qemu-system-x86_64",
            "-machine",
            "q35",
            "-accel",
        ])
        .arg(match accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
        .args(["-m", "1536", "-smp", "2", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots on a panic, and -no-reboot turns that into an exit.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn().context("starting qemu-system-x86_64")?;
    let (send, receive) = mpsc::channel();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    for (stream, prefix) in [
        (Box::new(stdout) as Box<dyn std::io::Read + Send>, ""),
        (Box::new(stderr), "qemu: "),
    ] {
        let send = send.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if send.send(format!("{prefix}{line}")).is_err() {
                    break;
                }
            }
        });
    }
    drop(send);
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut console = Console {
        lines: Vec::new(),
        stopped: None,
        elapsed: Duration::ZERO,
    };
    let deadline = start + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match receive.recv_timeout(left) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if line.contains("@@ ") {
                    eprintln!("    {}", line.trim_start_matches(|c| c != '@'));
                }
                console.lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                console.stopped = Some(format!(
                    "time limit of {} s reached; qemu killed",
                    limit.as_secs()
                ));
                // Our own child, by its handle.
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    console.elapsed = start.elapsed();
    if console.stopped.is_none() && !status.success() {
        console.stopped = Some(format!("qemu exited with {status}"));
    }
    Ok(console)
}
