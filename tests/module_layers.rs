//! The crate's modules stand in layers that follow the request (docs/architecture.md, "Map of
//! src/"): a module may use the modules in the layers below its own, never one beside or above
//! it. So the module graph has no cycle, and a change low down cannot depend on the edge.
//!
//! This test reads every `crate::` path in `src/` (in `use` lines and inline, test code
//! included; comments and string literals skipped) and fails on each one that points sideways
//! or up. A second test holds files to one concept each: past [`LONG_FILE`] lines of non-test
//! code, a file says at its top why it is one file (a `//! Length: …` line). Run both with
//! `cargo test --test module_layers`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom first. A module may import only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["domain", "mock", "net"],
    &["config"],
    &["telemetry", "ledger"],
    &["cache"],
    &["metering", "billing"],
    &["auth"],
    &["proxy", "admin"],
    &["state"],
    &["routes"],
    &["app"],
    &["cli"],
];

/// Imports allowed only in tests: the shared test support (tests/support), declared in lib.rs.
const TEST_ONLY: &[&str] = &["test_support"];

#[test]
fn no_module_imports_one_beside_or_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut checked = BTreeSet::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).expect("under src");
        let Some(from) = top_module(relative) else {
            continue; // lib.rs and main.rs declare and run the modules
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (line, to) in crate_imports(&code_only(&text)) {
            if to == from || TEST_ONLY.contains(&to.as_str()) {
                continue;
            }
            if !checked.insert((relative.to_path_buf(), to.clone())) {
                continue; // one verdict per file and module is enough
            }
            let place = format!("src/{}:{line}", relative.display());
            match (layer(&from), layer(&to)) {
                (Some(a), Some(b)) if b < a => {}
                (Some(_), Some(_)) => {
                    problems.push(format!("{place}: `{from}` imports `{to}`, not below it"))
                }
                (None, _) => problems.push(format!("{place}: `{from}` is in no layer")),
                (_, None) => problems.push(format!("{place}: `{to}` is in no layer")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Past this many lines of non-test code, a file's leading docs say why it is one file.
const LONG_FILE: usize = 500;

/// Files that are test code as a whole (declared under `#[cfg(test)]`).
const TEST_FILES: &[&str] = &["tests.rs", "contract.rs"];

#[test]
fn a_long_file_says_why_it_is_one_file() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    for file in rust_files(&src) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if TEST_FILES.contains(&name) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let lines = non_test_lines(&text);
        if lines > LONG_FILE && !says_why_long(&text) {
            let relative = file.strip_prefix(&src).expect("under src");
            problems.push(format!(
                "src/{}: {lines} lines of non-test code and no `//! Length:` line saying why",
                relative.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_size_check_counts_code_before_the_tests_and_reads_the_reason() {
    let text =
        "//! A module.\n//!\n//! Length: one table.\n\nfn a() {}\n\n#[cfg(test)]\nmod tests {\n}\n";
    assert_eq!(non_test_lines(text), 6);
    assert!(says_why_long(text));
    assert!(!says_why_long(
        "//! A module.\n\n//! Length: not at the top.\n"
    ));
    assert_eq!(non_test_lines("#[cfg(test)]\nmod tests;\nfn a() {}\n"), 3);
}

/// The lines before the file's inline test module (`#[cfg(test)]` then `mod tests {`).
fn non_test_lines(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .position(|pair| pair[0].starts_with("#[cfg(test)]") && pair[1].starts_with("mod tests {"))
        .unwrap_or(lines.len())
}

/// Whether the file's leading `//!` docs hold a `//! Length:` line.
fn says_why_long(text: &str) -> bool {
    text.lines()
        .take_while(|line| line.starts_with("//!"))
        .any(|line| line.starts_with("//! Length:"))
}

/// The reader itself: blanked comments and strings, braces, `$crate` and nested groups.
#[test]
fn the_reader_finds_every_crate_path_and_nothing_else() {
    let text = r##"
use crate::domain::Credits;
use crate::{cache, ledger::{self, Ledger},
    metering};
// use crate::commented;
/* crate::blocked */ let s = "crate::quoted"; let r = r#"crate::raw"#;
let c = '"'; let l: &'static str = x; fn f<'a>() { crate::proxy::go() }
$crate::billing::thing!()
/// [`crate::doc_link`]
let not = my_crate::x;
"##;
    let imports: Vec<(usize, String)> = crate_imports(&code_only(text));
    let names: Vec<&str> = imports.iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(
        names,
        ["domain", "cache", "ledger", "metering", "proxy", "billing"]
    );
    assert_eq!(imports[4].0, 7, "line numbers survive blanking");
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// `foo.rs` and `foo/…` belong to module `foo`; the crate roots to none.
fn top_module(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The text with comments, string and char literals replaced by spaces (newlines kept).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        let skip = if rest.starts_with(&['/', '/']) {
            rest.iter().position(|&c| c == '\n').unwrap_or(rest.len())
        } else if rest.starts_with(&['/', '*']) {
            block_comment_len(rest)
        } else if rest[0] == '"' {
            1 + string_len(&rest[1..])
        } else if rest[0] == 'r' && raw_string_hashes(rest).is_some() {
            raw_string_len(rest)
        } else if rest[0] == '\'' {
            char_literal_len(rest)
        } else {
            0
        };
        if skip == 0 {
            out.push(rest[0]);
            i += 1;
        } else {
            out.extend(rest[..skip].iter().map(|&c| blank(c)));
            i += skip;
        }
    }
    out
}

fn block_comment_len(rest: &[char]) -> usize {
    let mut depth = 0;
    let mut i = 0;
    while i + 1 < rest.len() {
        match (rest[i], rest[i + 1]) {
            ('/', '*') => {
                depth += 1;
                i += 2;
            }
            ('*', '/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    rest.len()
}

/// Length of a string body up to and including its closing quote.
fn string_len(body: &[char]) -> usize {
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    body.len()
}

/// `r"…"`, `r#"…"#`: the number of `#`, when `rest` starts a raw string (and `r` is not the
/// end of an identifier, which the caller's scan order already rules out for `br`).
fn raw_string_hashes(rest: &[char]) -> Option<usize> {
    let hashes = rest[1..].iter().take_while(|&&c| c == '#').count();
    (rest.get(1 + hashes) == Some(&'"')).then_some(hashes)
}

fn raw_string_len(rest: &[char]) -> usize {
    let hashes = raw_string_hashes(rest).unwrap_or(0);
    let start = 2 + hashes;
    let mut i = start;
    while i < rest.len() {
        if rest[i] == '"'
            && rest[i + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
        {
            return i + 1 + hashes;
        }
        i += 1;
    }
    rest.len()
}

/// A char literal's length, or 0 for a lifetime (`'a`), which stays code.
fn char_literal_len(rest: &[char]) -> usize {
    match rest.get(1) {
        Some('\\') => rest[2..]
            .iter()
            .position(|&c| c == '\'')
            .map_or(0, |p| p + 3),
        Some(_) if rest.get(2) == Some(&'\'') => 3,
        _ => 0,
    }
}

/// Every top-level module named by a `crate::` (or `$crate::`) path, with its line number.
fn crate_imports(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::").map(|at| from + at) {
        let after = &code[at + "crate::".len()..];
        from = at + "crate::".len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `my_crate::`
        }
        let line = 1 + code[..at].matches('\n').count();
        if let Some(group) = after.strip_prefix('{') {
            found.extend(top_level_items(group).into_iter().map(|item| (line, item)));
        } else {
            found.push((line, identifier(after)));
        }
    }
    found.retain(|(_, name)| !name.is_empty() && name != "self");
    found
}

/// The first identifier of each item in a `{a, b::c, d::{e}}` group (the text after `{`).
fn top_level_items(group: &str) -> Vec<String> {
    let mut items = vec![identifier(group.trim_start())];
    let mut depth = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => items.push(identifier(group[i + 1..].trim_start())),
            _ => {}
        }
    }
    items
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}
