//! `cargo xtask chaos [--quick]`: the fault-injection suite (three agents in
//! network namespaces sharing Redis and a Redis Cluster, faults on a
//! schedule, a checker over the recorded history). Its report replaces the
//! `chaos` section of `bench/RESULTS.md`; a refused history fails the command.

use anyhow::Context as _;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Shorter faults and quiet times.
    #[arg(long)]
    quick: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure(setup::Need::All)?;
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "limiter-agent",
        "--package",
        "limiter-tests",
        "--package",
        "limiter-bench",
        "--bins",
    ]))?;
    let root = cmd::workspace_root();
    let out = root.join("target/bench/chaos");
    std::fs::create_dir_all(&out)?;
    let mut chaos = std::process::Command::new(root.join("target/release/chaos"));
    chaos.env("LIMITER_BENCH_OUT", &out);
    if options.quick {
        chaos.arg("--quick");
    }
    // The report is written even when the checker refuses a history.
    let checked = cmd::run(&mut chaos);
    std::fs::copy(out.join("chaos.json"), root.join("target/bench/chaos.json"))
        .context("copying chaos.json")?;
    cmd::run(
        std::process::Command::new(root.join("target/release/bench-report"))
            .arg(&out)
            .arg(&out),
    )?;
    let section = std::fs::read_to_string(out.join("RESULTS.md"))?;
    let section = section
        .find("## chaos")
        .map(|at| &section[at..])
        .context("the report has no chaos section")?;
    let results = root.join("bench/RESULTS.md");
    let text = std::fs::read_to_string(&results)?;
    std::fs::write(&results, splice(&text, section))?;
    eprintln!("bench/RESULTS.md: chaos section written");
    checked
}

/// `text` with its `## chaos` section (up to the next `## `) replaced by
/// `section`, or with `section` added at the end.
fn splice(text: &str, section: &str) -> String {
    let section = section.trim_end();
    match text.find("\n## chaos") {
        Some(start) => {
            let after = text[start + 1..]
                .find("\n## ")
                .map_or(text.len(), |end| start + 1 + end);
            format!("{}\n{section}\n{}", &text[..start], &text[after..])
        }
        None => format!("{}\n\n{section}\n", text.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn the_chaos_section_is_replaced_in_place_or_added() {
        let text = "# R\n\n## a\nx\n\n## chaos: old\nold\n\n## b\ny\n";
        assert_eq!(
            splice(text, "## chaos: new\nnew\n"),
            "# R\n\n## a\nx\n\n## chaos: new\nnew\n\n## b\ny\n"
        );
        assert_eq!(
            splice("# R\n\n## a\nx\n", "## chaos: new\n"),
            "# R\n\n## a\nx\n\n## chaos: new\n"
        );
    }
}
