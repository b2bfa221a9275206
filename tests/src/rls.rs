//! A client of Envoy's rate limit service that nobody here wrote: Python
//! `grpcio` with the Envoy API types of the `envoy-data-plane` package
//! (`tests/routers/rls_client.py`, installed by `cargo xtask setup` with the
//! routers), sending the calls Envoy sends.

use std::{
    io::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::netns::Netns;

/// One descriptor: its entries and, optionally, its own `hits_addend`.
#[must_use]
pub fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> Value {
    json!({ "entries": entries.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>(), "hits_addend": hits })
}

/// One `ShouldRateLimit` call.
#[must_use]
pub fn call(domain: &str, descriptors: &[Value], hits_addend: u32) -> Value {
    json!({ "domain": domain, "descriptors": descriptors, "hits_addend": hits_addend })
}

/// The call Envoy makes for a request to `path` from `remote`, in the
/// default domain.
#[must_use]
pub fn path_call(path: &str, remote: &str) -> Value {
    call(
        "limiter",
        &[descriptor(
            &[("path", path), ("remote_address", remote)],
            None,
        )],
        0,
    )
}

/// Makes `calls` against the service at `target`, `concurrency` in flight at
/// once, from this namespace or `ns`; the answers in call order (see the
/// client's doc for their shape).
///
/// # Panics
/// The client is not installed, or it failed.
#[must_use]
pub fn run(
    target: SocketAddr,
    calls: &[Value],
    concurrency: usize,
    ns: Option<&Netns>,
) -> Vec<Value> {
    run_with(target, calls, concurrency, ns, &[])
}

/// As [`run`], with `metadata` sent with every call (Envoy's
/// `grpc_service.initial_metadata`).
///
/// # Panics
/// The client is not installed, or it failed.
#[must_use]
pub fn run_with(
    target: SocketAddr,
    calls: &[Value],
    concurrency: usize,
    ns: Option<&Netns>,
    metadata: &[(&str, &str)],
) -> Vec<Value> {
    let dir = crate::routers::dir();
    let python = dir.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` to install the RLS client",
        python.display()
    );
    let mut command = Command::new(python);
    command
        .arg(dir.join("rls_client.py"))
        .arg(target.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = ns {
        ns.enter_on_exec(&mut command);
    }
    let mut child = command.spawn().expect("starting the RLS client");
    let metadata: Vec<[&str; 2]> = metadata.iter().map(|(k, v)| [*k, *v]).collect();
    let input = json!({
        "concurrency": concurrency,
        "timeout": 10.0,
        "calls": calls,
        "metadata": metadata,
    });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("writing the calls");
    let output = child.wait_with_output().expect("the RLS client");
    assert!(
        output.status.success(),
        "the RLS client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<Value> =
        serde_json::from_slice(&output.stdout).expect("the RLS client's JSON");
    assert_eq!(answers.len(), calls.len(), "one answer per call");
    answers
}

/// A response header of an answer, by lowercase name.
#[must_use]
pub fn header<'a>(answer: &'a Value, name: &str) -> Option<&'a str> {
    answer["response_headers_to_add"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str() == Some(name))
        .and_then(|h| h[1].as_str())
}

/// The overall code (`OK`, `OVER_LIMIT`), or `error:<grpc code>`.
#[must_use]
pub fn code(answer: &Value) -> String {
    match answer["overall_code"].as_str() {
        Some(code) => code.to_owned(),
        None => format!("error:{}", answer["error"]["code"].as_str().unwrap_or("?")),
    }
}
