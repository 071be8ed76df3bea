//! `dialback check`: every independent problem of a config file in one run.
//!
//! The loaders used at startup stop at the first error. Here the file is read leniently
//! (unknown keys and mistyped values are recorded and set aside, see [`Source::lenient`]), and
//! then every value is checked:
//!
//! - gateway configs go through [`gateway::check`], which checks each key and each service on
//!   its own;
//! - agent configs go through the agent loader, which stops at its first error: after each
//!   error the offending part is set aside (a bad service removed, a bad value replaced by a
//!   harmless placeholder) and the loader runs again, until it passes or nothing more can be
//!   set aside. Complaints that only follow from something already reported (a password that
//!   was mistyped is then "missing") are left out.
//!
//! Whatever this finds, the file is also loaded by the strict loader when no problem is left,
//! so `check` never passes a file that `gateway` or `agent` would refuse.

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::common::EnvLookup;
use super::source::{key_path, Source};
use super::{agent, gateway, load_any_str, read, ConfigError, ConfigKind};

/// What `dialback check` found in one file.
#[derive(Debug)]
pub struct Report {
    /// The path as the user gave it.
    pub file: String,
    /// What the file was checked as; `None` when it could not be read or is not TOML.
    pub kind: Option<ConfigKind>,
    /// `[services.NAME]` tables, valid or not.
    pub service_count: usize,
    /// Sorted by line; problems about the whole file (no line) come first.
    pub problems: Vec<ConfigError>,
    pub warnings: Vec<String>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as printed: one line per problem (`FILE:LINE: KEY: message`), one per
    /// warning (`warning: FILE:LINE: KEY: message`), then a summary line, either
    /// `FILE: ok (gateway, 2 services)` or `FILE: 3 problems (gateway config)`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for problem in &self.problems {
            out.push_str(&format!("{problem}\n"));
        }
        for warning in &self.warnings {
            out.push_str(&format!("warning: {warning}\n"));
        }
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let problems = plural(self.problems.len(), "problem");
        match self.kind {
            Some(kind) if self.is_ok() => out.push_str(&format!(
                "{}: ok ({kind}, {})\n",
                self.file,
                plural(self.service_count, "service")
            )),
            Some(kind) => out.push_str(&format!("{}: {problems} ({kind} config)\n", self.file)),
            None => out.push_str(&format!("{}: {problems}\n", self.file)),
        }
        out
    }
}

/// Checks the config file at `path`, of whichever kind it is.
pub fn check_file(path: &Path) -> Report {
    match read(path) {
        Ok(text) => check_str(path, &text, &super::process_env),
        Err(e) => Report {
            file: path.display().to_string(),
            kind: None,
            service_count: 0,
            problems: vec![e],
            warnings: Vec::new(),
        },
    }
}

pub(super) fn check_str(path: &Path, text: &str, env: EnvLookup<'_>) -> Report {
    let kind = super::detect_kind(text);
    let (mut problems, mut warnings) = match kind {
        ConfigKind::Gateway => check_gateway(path, text, env),
        ConfigKind::Agent => check_agent(path, text, env),
    };
    let mut service_count = count_services(text);
    if problems.is_empty() {
        // The startup loaders have the last word.
        match load_any_str(path, text, env) {
            Ok((config, strict_warnings)) => {
                service_count = config.service_count();
                warnings = strict_warnings;
            }
            Err(e) => problems.push(e),
        }
    }
    // Stable: problems on one line stay in the order they were found.
    problems.sort_by_key(|p| p.line().unwrap_or(0));
    let is_toml = text.parse::<toml::Table>().is_ok();
    Report {
        file: path.display().to_string(),
        kind: is_toml.then_some(kind),
        service_count,
        problems,
        warnings,
    }
}

fn count_services(text: &str) -> usize {
    text.parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("services")?.as_table().map(toml::Table::len))
        .unwrap_or(0)
}

fn check_gateway(path: &Path, text: &str, env: EnvLookup<'_>) -> (Vec<ConfigError>, Vec<String>) {
    let src = Source::lenient(path, text);
    let checked = gateway::check(&src, env);
    let mut problems = src.take_problems();
    match checked {
        Ok(checked) => {
            problems.extend(checked.problems);
            (problems, checked.warnings)
        }
        Err(fatal) => {
            problems.push(fatal);
            (problems, Vec::new())
        }
    }
}

// ---- agent: run the loader, set aside what it stopped at, run it again ----

const PLACEHOLDER_FINGERPRINT: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";
const PLACEHOLDER_PASSWORD: &str = "placeholder-password-for-check";
const PLACEHOLDER_ADDRESS: &str = "localhost:1";
const PLACEHOLDER_PROXY: &str = "http://localhost:1";
const TRUST_KEYS: &[&str] = &["fingerprint", "ca_file", "ca", "insecure"];
const PASSWORD_KEYS: &[&str] = &["password", "password_file", "password_env"];

/// A change to the parsed document that sets aside a reported problem.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fix {
    /// Set the string at this key path (the tables on the way exist).
    Set(Vec<String>, &'static str),
    /// Remove the entry at this key path.
    Remove(Vec<String>),
    /// Replace `proxies[i]` (0-based) with a plain proxy URL.
    Proxy(usize),
}

fn check_agent(path: &Path, text: &str, env: EnvLookup<'_>) -> (Vec<ConfigError>, Vec<String>) {
    let services = service_names(text);
    let mut fixes: Vec<Fix> = Vec::new();
    let mut shape_problems = None;
    let mut dropped = Vec::new();
    let mut problems = Vec::new();
    // Each round adds a fix or stops; the bound is only a safety net.
    for _ in 0..1000 {
        let edits = fixes.clone();
        let src = Source::lenient(path, text).with_edit(Box::new(move |doc| {
            for fix in &edits {
                apply(doc, fix);
            }
        }));
        let result = agent::parse(&src, env);
        if shape_problems.is_none() {
            shape_problems = Some(src.take_problems());
            dropped = src.dropped_keys();
        }
        let error = match result {
            Ok((_, warnings)) => {
                let mut all = shape_problems.unwrap_or_default();
                all.extend(problems);
                return (all, warnings);
            }
            Err(error) => error,
        };
        let new_fixes: Vec<Fix> = fixes_for(&error, &services)
            .into_iter()
            .filter(|f| !fixes.contains(f))
            .collect();
        if !is_consequence(&error, &dropped, &fixes) {
            problems.push(error);
        }
        if new_fixes.is_empty() {
            break;
        }
        fixes.extend(new_fixes);
    }
    let mut all = shape_problems.unwrap_or_default();
    all.extend(problems);
    (all, Vec::new())
}

/// The names of the `[services.NAME]` tables, with their key paths.
fn service_names(text: &str) -> Vec<(String, String)> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(services) = table.get("services").and_then(toml::Value::as_table) else {
        return Vec::new();
    };
    services
        .keys()
        .map(|name| (name.clone(), key_path(["services", name.as_str()])))
        .collect()
}

fn path(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// What to set aside after `error` so the agent loader gets past it.
fn fixes_for(error: &ConfigError, services: &[(String, String)]) -> Vec<Fix> {
    let message = error.message.as_str();
    let Some(key) = error.key() else {
        if message == agent::NO_TRUST_MESSAGE {
            return vec![Fix::Set(path(&["fingerprint"]), PLACEHOLDER_FINGERPRINT)];
        }
        return Vec::new();
    };
    let conflict = message.starts_with("set only one of");
    match key {
        "gateway" => vec![Fix::Set(path(&["gateway"]), PLACEHOLDER_ADDRESS)],
        "server_name" | "connect_timeout" => vec![Fix::Remove(path(&[key]))],
        // A bad value is removed rather than replaced, so that a conflict with another trust
        // option is not reported with a value the file does not have; "no way to verify"
        // after that is a consequence.
        k if TRUST_KEYS.contains(&k) => vec![Fix::Remove(path(&[k]))],
        "reconnect_min" | "reconnect_max" => {
            if message.contains("must not be shorter") {
                vec![
                    Fix::Remove(path(&["reconnect_min"])),
                    Fix::Remove(path(&["reconnect_max"])),
                ]
            } else {
                vec![Fix::Remove(path(&[key]))]
            }
        }
        k if k.starts_with("proxies[") => k["proxies[".len()..]
            .split(']')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1)
            .map(|n| vec![Fix::Proxy(n - 1)])
            .unwrap_or_default(),
        k => {
            let Some((name, service)) = services
                .iter()
                .find(|(_, p)| k == p || k.starts_with(&format!("{p}.")))
            else {
                // Another top-level key (one this code does not know yet): optional keys
                // are simply removed.
                let plain = k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                return if plain && k != "services" {
                    vec![Fix::Remove(path(&[k]))]
                } else {
                    Vec::new()
                };
            };
            let at = |leaf: &str| vec!["services".to_owned(), name.clone(), leaf.to_owned()];
            let rest = &k[service.len()..];
            if rest.starts_with(".password") || message.starts_with("no password") || conflict {
                // Whatever is wrong with the password, a plain one lets the rest be checked.
                let mut fixes: Vec<Fix> =
                    PASSWORD_KEYS.iter().map(|p| Fix::Remove(at(p))).collect();
                fixes.push(Fix::Set(at("password"), PLACEHOLDER_PASSWORD));
                fixes
            } else if rest == ".local" || message.starts_with("no local address") {
                vec![Fix::Set(at("local"), PLACEHOLDER_ADDRESS)]
            } else {
                vec![Fix::Remove(vec!["services".to_owned(), name.clone()])]
            }
        }
    }
}

/// Whether `error` only follows from something already reported: a key dropped for its shape
/// (then "missing"), or a value set aside by an earlier fix.
fn is_consequence(error: &ConfigError, dropped: &[String], fixes: &[Fix]) -> bool {
    let message = error.message.as_str();
    let was_dropped = |key: &str| dropped.iter().any(|d| d == key);
    let dropped_under = |prefix: &str| dropped.iter().any(|d| d.starts_with(prefix));
    let removed = |key: &str| {
        fixes
            .iter()
            .any(|f| matches!(f, Fix::Remove(p) if p.len() == 1 && p[0] == key))
    };
    match error.key() {
        None if message == agent::NO_TRUST_MESSAGE => {
            TRUST_KEYS.iter().any(|k| was_dropped(k) || removed(k))
        }
        None if message.starts_with("no services") => {
            was_dropped("services")
                || fixes
                    .iter()
                    .any(|f| matches!(f, Fix::Remove(p) if p.len() == 2 && p[0] == "services"))
        }
        Some("gateway") if message.starts_with("missing") => was_dropped("gateway"),
        Some("reconnect_min" | "reconnect_max") if message.contains("must not be shorter") => {
            ["reconnect_min", "reconnect_max"]
                .iter()
                .any(|k| was_dropped(k) || removed(k))
        }
        Some(service) if message.starts_with("no password") => {
            dropped_under(&format!("{service}.password"))
        }
        Some(service) if message.starts_with("no local address") => {
            was_dropped(&format!("{service}.local"))
        }
        _ => false,
    }
}

fn apply(doc: &mut DeTable<'_>, fix: &Fix) {
    match fix {
        Fix::Set(path, value) => {
            let Some((leaf, tables)) = path.split_last() else {
                return;
            };
            let Some(table) = table_at(doc, tables) else {
                return;
            };
            let span = table.get(leaf.as_str()).map(Spanned::span).unwrap_or(0..0);
            table.remove(leaf.as_str());
            table.insert(
                Spanned::new(span.clone(), Cow::Owned(leaf.clone())),
                string(span, value),
            );
        }
        Fix::Remove(path) => {
            let Some((leaf, tables)) = path.split_last() else {
                return;
            };
            if let Some(table) = table_at(doc, tables) {
                table.remove(leaf.as_str());
            }
        }
        Fix::Proxy(i) => {
            if let Some(DeValue::Array(items)) = doc.get_mut("proxies").map(Spanned::get_mut) {
                if let Some(item) = items.get_mut(*i) {
                    *item = string(item.span(), PLACEHOLDER_PROXY);
                }
            }
        }
    }
}

fn string<'i>(span: Range<usize>, value: &str) -> Spanned<DeValue<'i>> {
    Spanned::new(span, DeValue::String(Cow::Owned(value.to_owned())))
}

fn table_at<'d, 'i>(doc: &'d mut DeTable<'i>, path: &[String]) -> Option<&'d mut DeTable<'i>> {
    let mut table = doc;
    for key in path {
        match table.get_mut(key.as_str())?.get_mut() {
            DeValue::Table(inner) => table = inner,
            _ => return None,
        }
    }
    Some(table)
}
