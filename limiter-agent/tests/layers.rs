//! The agent's module layers, listed once in `docs/architecture.md` (the
//! `layers` block, top layer first), held against the code: every path into
//! the crate (`use crate::…`, `super::…`, `self::…`, a child module's name, a
//! `crate::…` path in an expression) is read from every source file, and the
//! test fails on
//! - an import from a module to one in a higher layer or in the same layer
//!   (modules on one line are independent of each other);
//! - a module missing from the list, or listed but absent;
//! - a circle of imports between modules, at any depth (a folder's files
//!   among themselves too). A module's file and the files of its own
//!   submodules (`proxy.rs` and `proxy/wire.rs`) are one unit here, as Rust
//!   makes them: the parent declares and re-exports its children, a child
//!   reads its parent's shared types. An import is lifted to the children of
//!   the two files' closest common module (`proxy/upstream.rs` importing
//!   `proxy/wire/body.rs` is `upstream` importing `wire`), so circles
//!   through siblings are what count, however deep the files sit.
//!
//! It reads the sources as text with comments and literals blanked, which is
//! all the resolution the crate's own paths need: a path resolves to the
//! deepest module file it names.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const ARCHITECTURE: &str = include_str!("../../docs/architecture.md");

/// One module file: its module path (`["proxy", "wire"]`) and its code with
/// comments, strings and character literals blanked.
struct Source {
    module: Vec<String>,
    file: String,
    code: String,
}

#[test]
fn imports_run_down_the_layers_and_never_in_a_circle() {
    let layers = layers();
    let sources = sources();
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    let edges = edges(&sources, &modules);

    let mut problems = Vec::new();
    let top: BTreeSet<&str> = modules
        .iter()
        .filter_map(|m| m.first().map(String::as_str))
        .collect();
    for name in &top {
        if !layers.contains_key(*name) {
            problems.push(format!(
                "module `{name}` is in no layer of docs/architecture.md"
            ));
        }
    }
    for name in layers.keys() {
        if !top.contains(name.as_str()) {
            problems.push(format!("layer list names `{name}`, which is not a module"));
        }
    }
    for ((from, to), files) in &edges {
        let (Some(a), Some(b)) = (from.first(), to.first()) else {
            continue;
        };
        if a == b {
            continue;
        }
        let (Some(&la), Some(&lb)) = (layers.get(a), layers.get(b)) else {
            continue;
        };
        if la <= lb {
            let how = if la == lb {
                "its own layer"
            } else {
                "a higher layer"
            };
            problems.push(format!(
                "{} imports {} from {how} ({a} is on layer {la}, {b} on {lb})",
                files.0, files.1
            ));
        }
    }
    for circle in circles(&edges) {
        problems.push(format!("import circle: {}", circle.join(" -> ")));
    }
    assert!(
        problems.is_empty(),
        "layer problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_reader_sees_every_kind_of_path() {
    let modules: BTreeSet<Vec<String>> = [
        vec!["a"],
        vec!["a", "b"],
        vec!["a", "c"],
        vec!["d"],
        vec!["e"],
    ]
    .into_iter()
    .map(|m| m.into_iter().map(String::from).collect())
    .collect();
    let code = blank(
        r##"
        mod c;
        use self::c::X; // crate::e::Commented
        use super::{b::Y, *};
        use c::Z as W;
        fn f() -> impl Sized + use<> { let s = "crate::e::InAString"; let b = br#"say "hi"#; crate::d::call(); }
        /* outer /* inner */ crate::e::StillAComment */
        #[cfg(test)]
        mod tests { use super::*; }
        "##,
    );
    let source = Source {
        module: vec!["a".into(), "b".into()],
        file: "a/b.rs".into(),
        code,
    };
    let found: BTreeSet<String> = targets(&source, &modules)
        .into_iter()
        .map(|m| m.join("::"))
        .collect();
    // `a::b::c` has no file here, so `use c::Z` names nothing in the crate;
    // `self::c::X` resolves to `a::b` itself.
    let expected: BTreeSet<String> = ["a", "a::b", "d"].into_iter().map(String::from).collect();
    assert_eq!(found, expected);
}

/// The `layers` block: one line a layer, top first; returns each module's
/// layer number, bottom layer 1.
fn layers() -> BTreeMap<String, usize> {
    let block = ARCHITECTURE
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/architecture.md has a ```layers block");
    let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut layers = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let level = lines.len() - i;
        let names = line.split_once(':').map_or(*line, |(_, names)| names);
        for name in names.split_whitespace() {
            assert!(
                layers.insert(name.to_owned(), level).is_none(),
                "`{name}` is listed twice in the layers block"
            );
        }
    }
    layers
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&root).expect("under src").to_path_buf();
            let mut module: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                // The binary reaches the library through `limiter_agent::`.
                Some("main") if module.len() == 1 => return None,
                Some("lib") if module.len() == 1 => module.clear(),
                Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            let text = fs::read_to_string(&path).expect("readable source");
            Some(Source {
                module,
                file: rel.display().to_string(),
                code: blank(&text),
            })
        })
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code with comments, string literals and character literals replaced by
/// spaces, so that only real paths remain.
fn blank(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest.
            let mut depth = 0;
            while i + 1 < chars.len() {
                if chars[i] == '/' && chars[i + 1] == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars[i + 1] == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if matches!(c, 'b' | 'c')
            && chars.get(i + 1) == Some(&'r')
            && matches!(chars.get(i + 2), Some('"' | '#'))
            && !ident_char(prev(&chars, i))
        {
            // `br"…"`, `cr#"…"#`: the prefix goes, the raw string is read next.
            out.push(' ');
            i += 1;
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (!ident_char(prev(&chars, i))
                || (matches!(prev(&chars, i), 'b' | 'c') && !ident_char(prev(&chars, i - 1))))
        {
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) == Some(&'"') {
                j += 1;
                loop {
                    if j >= chars.len() {
                        break;
                    }
                    if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push(' ');
                i = j;
            } else {
                out.push(c);
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A character literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev(chars: &[char], i: usize) -> char {
    if i == 0 { ' ' } else { chars[i - 1] }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if ident_char(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The modules one file's paths lead to (resolved to the deepest module file
/// each names).
fn targets(source: &Source, modules: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let tokens = tokens(&source.code);
    // Inline modules (`mod tests { … }`): the stack of (name, brace depth).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut paths: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let here = || {
            let mut m = source.module.clone();
            m.extend(inline.iter().map(|(n, _)| n.clone()));
            m
        };
        match tokens[i].as_str() {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t == "{") => {
                inline.push((tokens[i + 1].clone(), depth));
                depth += 1;
                i += 3;
                continue;
            }
            // `impl Trait + use<'a>` is a bound, not an import.
            "use" if tokens.get(i + 1).is_none_or(|t| t != "<") => {
                let module = here();
                let mut j = i + 1;
                let mut found = Vec::new();
                use_tree(&tokens, &mut j, Vec::new(), &mut found);
                paths.extend(found.into_iter().map(|p| (module.clone(), p)));
                while j < tokens.len() && tokens[j] != ";" {
                    j += 1;
                }
                i = j + 1;
                continue;
            }
            "crate" | "super" | "self"
                if tokens.get(i + 1).is_some_and(|t| t == "::")
                    && !(i > 0 && tokens[i - 1] == "::") =>
            {
                let mut path = vec![tokens[i].clone()];
                let mut j = i + 1;
                while tokens.get(j).is_some_and(|t| t == "::")
                    && tokens.get(j + 1).is_some_and(|t| t.chars().all(ident_char))
                {
                    path.push(tokens[j + 1].clone());
                    j += 2;
                }
                paths.push((here(), path));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    paths
        .into_iter()
        .filter_map(|(module, path)| resolve(&module, &path, modules))
        .collect()
}

/// Reads one use tree from `tokens[*i]`, appending each full path to `out`.
fn use_tree(tokens: &[String], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    match tokens.get(*i).map(String::as_str) {
        Some("{") => {
            *i += 1;
            while tokens.get(*i).is_some_and(|t| t != "}") {
                use_tree(tokens, i, prefix.clone(), out);
                if tokens.get(*i).is_some_and(|t| t == ",") {
                    *i += 1;
                }
            }
            *i += 1;
        }
        Some("*") => {
            *i += 1;
            out.push(prefix);
        }
        Some(name) if name.chars().all(ident_char) => {
            let mut path = prefix;
            path.push(name.to_owned());
            *i += 1;
            if tokens.get(*i).is_some_and(|t| t == "::") {
                *i += 1;
                use_tree(tokens, i, path, out);
            } else {
                if tokens.get(*i).is_some_and(|t| t == "as") {
                    *i += 2;
                }
                out.push(path);
            }
        }
        _ => *i += 1,
    }
}

/// A path written in `module` as the deepest module file it names, or `None`
/// for paths outside the crate.
fn resolve(
    module: &[String],
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut absolute: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("self") => module.to_vec(),
        Some("super") => {
            let mut m = module.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                m.pop();
                rest = &rest[1..];
            }
            m.extend(rest.iter().cloned());
            return deepest(&m, modules);
        }
        Some(first) => {
            // A child module's name, written without `self::`.
            let mut child = module.to_vec();
            child.push(first.to_owned());
            if !modules.contains(&child) {
                return None;
            }
            let mut m = module.to_vec();
            m.extend(path.iter().cloned());
            return deepest(&m, modules);
        }
        None => return None,
    };
    absolute.extend(path[1..].iter().cloned());
    deepest(&absolute, modules)
}

fn deepest(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains(m))
}

type Edges = BTreeMap<(Vec<String>, Vec<String>), (String, String)>;

/// File-to-file imports, each with the two files' names.
fn edges(sources: &[Source], modules: &BTreeSet<Vec<String>>) -> Edges {
    let files: BTreeMap<&Vec<String>, &str> = sources
        .iter()
        .map(|s| (&s.module, s.file.as_str()))
        .collect();
    let mut edges = Edges::new();
    for source in sources {
        for target in targets(source, modules) {
            if target != source.module {
                let to = files[&target].to_owned();
                edges.insert((source.module.clone(), target), (source.file.clone(), to));
            }
        }
    }
    edges
}

/// Every set of files that import each other in a circle (strongly connected
/// components of more than one file), each as one circle's file names.
fn circles(edges: &Edges) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    let mut names: BTreeMap<&Vec<String>, &str> = BTreeMap::new();
    // Each import between two files lifted to the children of their closest
    // common module: `proxy/upstream.rs` importing `proxy/wire/body.rs` is
    // `upstream` importing `wire`, so a circle through a submodule closes.
    let mut lifted: Edges = BTreeMap::new();
    for ((from, to), files) in edges {
        if from.starts_with(to) || to.starts_with(from) {
            continue;
        }
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        lifted
            .entry((from[..=common].to_vec(), to[..=common].to_vec()))
            .or_insert_with(|| files.clone());
    }
    for ((from, to), (a, b)) in &lifted {
        graph.entry(from).or_default().push(to);
        graph.entry(to).or_default();
        names.entry(from).or_insert(a);
        names.entry(to).or_insert(b);
    }
    // Kosaraju: finish order on the graph, then components on its reverse.
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for &start in graph.keys() {
        finish(start, &graph, &mut seen, &mut order);
    }
    let mut reverse: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (&from, tos) in &graph {
        for &to in tos {
            reverse.entry(to).or_default().push(from);
        }
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for &start in order.iter().rev() {
        if assigned.contains(start) {
            continue;
        }
        let mut component = Vec::new();
        let mut stack = vec![start];
        assigned.insert(start);
        while let Some(node) = stack.pop() {
            component.push(names[node].to_owned());
            for &next in reverse.get(node).into_iter().flatten() {
                if assigned.insert(next) {
                    stack.push(next);
                }
            }
        }
        if component.len() > 1 {
            component.sort();
            out.push(component);
        }
    }
    out
}

fn finish<'a>(
    node: &'a Vec<String>,
    graph: &BTreeMap<&'a Vec<String>, Vec<&'a Vec<String>>>,
    seen: &mut BTreeSet<&'a Vec<String>>,
    order: &mut Vec<&'a Vec<String>>,
) {
    if !seen.insert(node) {
        return;
    }
    for &next in &graph[node] {
        finish(next, graph, seen, order);
    }
    order.push(node);
}
