//! Reading a VM's console into per-step results, and the matrix table that
//! `docs/testing.md` carries.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use super::{kernel::Kernel, qemu::Console};

/// One kernel's run.
pub struct Outcome {
    pub kernel: Kernel,
    package: String,
    /// `uname -r` inside the VM.
    release: Option<String>,
    /// `bpf_ktime_get_coarse_ns` available to XDP programs.
    coarse_clock: Option<bool>,
    /// (step, passed, detail), in the order of `STEPS`.
    steps: Vec<(&'static str, bool, String)>,
    /// The VM powered off after its last step.
    done: bool,
    /// Why the run stopped short, if it did.
    problem: Option<String>,
    elapsed: Duration,
    log: Option<PathBuf>,
    tail: Vec<String>,
}

impl Outcome {
    /// A kernel whose VM could not even be started.
    pub fn broken(kernel: Kernel, problem: String) -> Self {
        Self {
            kernel,
            package: String::new(),
            release: None,
            coarse_clock: None,
            steps: Vec::new(),
            done: false,
            problem: Some(problem),
            elapsed: Duration::ZERO,
            log: None,
            tail: Vec::new(),
        }
    }

    /// Reads the `@@` lines `init.sh` printed; a step in `expected` that never
    /// reported counts as failed.
    pub fn read(
        kernel: Kernel,
        package: String,
        console: &Console,
        expected: &[&'static str],
        log: PathBuf,
    ) -> Self {
        let mut outcome = Self::broken(kernel, String::new());
        outcome.problem.clone_from(&console.stopped);
        outcome.package = package;
        outcome.elapsed = console.elapsed;
        outcome.log = Some(log);
        outcome.tail = console.lines.iter().rev().take(40).rev().cloned().collect();
        let mut reported = Vec::new();
        for line in &console.lines {
            // Kernel messages can share a console line with a report.
            let Some((_, report)) = line.split_once("@@ ") else {
                continue;
            };
            let mut words = report.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("kernel"), Some(release), _) => outcome.release = Some(release.to_owned()),
                (Some("feature"), Some("coarse_clock"), Some(value)) => {
                    outcome.coarse_clock = Some(value.trim() == "yes");
                }
                (Some("step"), Some(name), Some(rest)) => {
                    let (status, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                    reported.push((name.to_owned(), status == "ok", detail.trim().to_owned()));
                }
                (Some("done"), ..) => outcome.done = true,
                _ => {}
            }
        }
        for step in expected {
            let mut results = reported.iter().filter(|(name, ..)| name == step);
            let (passed, detail) = match (results.next(), results.next()) {
                (Some((_, passed, detail)), None) => (*passed, detail.clone()),
                (Some(_), Some(_)) => (false, "reported twice".to_owned()),
                (None, _) => (false, "never reported".to_owned()),
            };
            outcome.steps.push((step, passed, detail));
        }
        for (name, ..) in &reported {
            if !expected.contains(&name.as_str()) {
                outcome.problem = Some(format!("unknown step `{name}` reported"));
            }
        }
        if !outcome.done && outcome.problem.is_none() {
            outcome.problem = Some("the VM stopped before its last step".to_owned());
        }
        outcome
    }

    pub fn passed(&self) -> bool {
        self.done
            && self.problem.is_none()
            && self.release.is_some()
            && self.coarse_clock.is_some()
            && !self.steps.is_empty()
            && self.steps.iter().all(|(_, passed, _)| *passed)
    }

    /// The kernel's block of the report: version, each step, and on failure
    /// the console's tail.
    pub fn print(&self) {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        eprintln!(
            "vm-test: Linux {} ({}, {}): {verdict} in {:.0} s; uname -r {}",
            self.kernel.name,
            self.kernel.suite,
            if self.package.is_empty() {
                "no package"
            } else {
                &self.package
            },
            self.elapsed.as_secs_f64(),
            self.release.as_deref().unwrap_or("never reported"),
        );
        eprintln!("  coarse clock helper: {}", self.coarse_clock_text());
        for (name, passed, detail) in &self.steps {
            let status = if *passed { "ok  " } else { "FAIL" };
            eprintln!("  {status} {name:<13} {detail}");
        }
        if let Some(problem) = &self.problem {
            eprintln!("  FAIL {problem}");
        }
        if !self.passed() {
            if let Some(log) = &self.log {
                eprintln!("  console tail (whole console in {}):", log.display());
            }
            for line in &self.tail {
                eprintln!("  | {line}");
            }
        }
    }

    fn coarse_clock_text(&self) -> String {
        let verifier = self
            .steps
            .iter()
            .find(|(name, passed, _)| *name == "coarse-clock" && *passed)
            .and_then(|(_, _, detail)| detail.split_once("verifier: "))
            .map(|(_, message)| format!("; forced on, the verifier says `{}`", message.trim()));
        match self.coarse_clock {
            Some(true) => "yes".to_owned(),
            Some(false) => format!(
                "no: disabled at load (`USE_COARSE_CLOCK` = 0){}",
                verifier.unwrap_or_default()
            ),
            None => "never reported".to_owned(),
        }
    }

    fn step_text(&self, names: &[&str]) -> String {
        let results: Vec<&(&str, bool, String)> = self
            .steps
            .iter()
            .filter(|(name, ..)| names.contains(name))
            .collect();
        if results.is_empty() {
            return "not run".to_owned();
        }
        match results.iter().find(|(_, passed, _)| !passed) {
            None => "pass".to_owned(),
            Some((name, _, _)) => format!("**FAIL** ({name})"),
        }
    }
}

/// The matrix as a Markdown table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| Kernel | Debian package | `bpf_ktime_get_coarse_ns` | XDP suite (`BPF_PROG_TEST_RUN`) | Load (aya), bpftool attach (`lo` generic, veth native), pinned maps | Real TCP traffic, ban drops (veth) | Result |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let suite = o
            .steps
            .iter()
            .find(|(name, ..)| *name == "suite")
            .map_or_else(String::new, |(_, passed, detail)| {
                if *passed {
                    detail
                        .split(';')
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("ok. ")
                        .to_owned()
                } else {
                    "**FAIL**".to_owned()
                }
            });
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | {} |",
            o.release.as_deref().unwrap_or(o.kernel.name),
            o.kernel.suite,
            if o.package.is_empty() {
                "–"
            } else {
                &o.package
            },
            o.coarse_clock_text(),
            suite,
            o.step_text(&[
                "bpffs",
                "modules",
                "load",
                "config",
                "attach-lo",
                "veth",
                "attach-veth",
                "prog-show",
                "net-show",
                "detach",
            ]),
            o.step_text(&[
                "traffic-veth",
                "traffic-lo",
                "map-sources",
                "map-stats",
                "ban",
                "ban-drops"
            ]),
            if o.passed() {
                format!("pass ({:.0} s)", o.elapsed.as_secs_f64())
            } else {
                "**FAIL**".to_owned()
            },
        );
    }
    out
}

const BEGIN: &str = "<!-- vm-test matrix: begin -->";
const END: &str = "<!-- vm-test matrix: end -->";

/// Replaces the table between the doc's markers.
pub fn update_doc(doc: &Path, table: &str) -> anyhow::Result<()> {
    let text = fs::read_to_string(doc)?;
    let (head, rest) = text
        .split_once(BEGIN)
        .with_context(|| format!("no `{BEGIN}` in {}", doc.display()))?;
    let (_, tail) = rest
        .split_once(END)
        .with_context(|| format!("no `{END}` in {}", doc.display()))?;
    fs::write(doc, format!("{head}{BEGIN}\n{table}{END}{tail}"))?;
    eprintln!("vm-test: updated the kernel table in {}", doc.display());
    Ok(())
}
