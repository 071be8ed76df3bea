//! The text of one config file, and turning byte spans into `file:line: key:` errors.

use std::cell::RefCell;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::ConfigError;

/// Keys from the design that this version does not implement yet; an unknown-field error on
/// one of them says so instead of looking like a typo.
const PLANNED_KEYS: &[&str] = &[];

pub struct Source<'a> {
    /// The path as the user gave it, for messages.
    pub file: String,
    /// Directory that relative paths in the file are resolved against.
    pub dir: PathBuf,
    pub text: &'a str,
    /// Set for `dialback check`: see [`Source::lenient`].
    lenient: Option<Lenient<'a>>,
}

/// Edits the parsed document before it is deserialized (used by `dialback check` to set aside
/// parts it has already reported).
pub type Edit<'a> = Box<dyn Fn(&mut DeTable<'_>) + 'a>;

/// What a lenient `deserialize` set aside.
struct Lenient<'a> {
    edit: Option<Edit<'a>>,
    problems: RefCell<Vec<ConfigError>>,
    /// Key paths of values that were dropped because their value had the wrong shape: the key
    /// is a real one, so "missing" complaints about it are consequences, not problems.
    dropped: RefCell<Vec<String>>,
}

/// A shape error located in the document: the error, and the key path to drop to get past it.
struct Located {
    error: ConfigError,
    path: Option<Vec<String>>,
    unknown_field: bool,
}

impl<'a> Source<'a> {
    pub fn new(path: &Path, text: &'a str) -> Self {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Source {
            file: path.display().to_string(),
            dir,
            text,
            lenient: None,
        }
    }

    /// A source whose `deserialize` does not stop at the first unknown key or mistyped value:
    /// it records the error, drops the key and tries again, so the value checks that follow
    /// still run on everything else. The recorded errors are in [`Source::take_problems`].
    /// Syntax errors still fail.
    pub fn lenient(path: &Path, text: &'a str) -> Self {
        Source {
            lenient: Some(Lenient {
                edit: None,
                problems: RefCell::new(Vec::new()),
                dropped: RefCell::new(Vec::new()),
            }),
            ..Source::new(path, text)
        }
    }

    /// Applies `edit` to the parsed document before every lenient `deserialize`.
    pub fn with_edit(mut self, edit: Edit<'a>) -> Self {
        if let Some(lenient) = &mut self.lenient {
            lenient.edit = Some(edit);
        }
        self
    }

    /// The shape errors a lenient `deserialize` recorded (and got past).
    pub fn take_problems(&self) -> Vec<ConfigError> {
        self.lenient
            .as_ref()
            .map(|l| l.problems.take())
            .unwrap_or_default()
    }

    /// Key paths (`services.web.password`) that a lenient `deserialize` dropped because of the
    /// shape of their value. Unknown keys are not listed.
    pub fn dropped_keys(&self) -> Vec<String> {
        self.lenient
            .as_ref()
            .map(|l| l.dropped.borrow().clone())
            .unwrap_or_default()
    }

    /// Whether `key` (a dotted key path) was dropped for the shape of its value.
    pub fn dropped(&self, key: &str) -> bool {
        self.lenient
            .as_ref()
            .is_some_and(|l| l.dropped.borrow().iter().any(|k| k == key))
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        self.text
            .bytes()
            .take(offset)
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// An error about the file as a whole (no line, no key).
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about `key`, located at `span` when there is one.
    pub fn error_at(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: span.map(|s| self.line_of(s.start)),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// The same location as `error_at`, as a warning string.
    pub fn warning_at(&self, span: Range<usize>, key: &str, message: &str) -> String {
        format!(
            "{}:{}: {key}: {message}",
            self.file,
            self.line_of(span.start)
        )
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        let mut resolved = self.dir.clone();
        resolved.extend(
            path.components()
                .filter(|c| !matches!(c, std::path::Component::CurDir)),
        );
        if resolved.as_os_str().is_empty() {
            resolved.push(".");
        }
        resolved
    }

    /// Parses the TOML text into `T`, mapping syntax and shape errors to located messages.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let mut doc = DeTable::parse(self.text).map_err(|e| {
            let span = e.span();
            ConfigError {
                file: self.file.clone(),
                line: span.map(|s| self.line_of(s.start)),
                key: None,
                message: format!("invalid TOML: {}", e.message().trim_end()),
            }
        })?;
        let Some(lenient) = &self.lenient else {
            return T::deserialize(toml::de::Deserializer::from(doc.clone()))
                .map_err(|e| self.locate(e, &doc).error);
        };
        if let Some(edit) = &lenient.edit {
            edit(doc.get_mut());
        }
        // Each round drops one key, so this ends; the bound is only a safety net.
        for _ in 0..10_000 {
            let e = match T::deserialize(toml::de::Deserializer::from(doc.clone())) {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let located = self.locate(e, &doc);
            let Some(path) = located.path.filter(|p| remove_path(doc.get_mut(), p)) else {
                return Err(located.error);
            };
            if !located.unknown_field {
                let key = key_path(path.iter().map(String::as_str));
                lenient.dropped.borrow_mut().push(key);
            }
            lenient.problems.borrow_mut().push(located.error);
        }
        Err(self.error("too many problems to go on"))
    }

    /// Turns a serde error into a located `ConfigError`, with the key path it is about.
    fn locate(&self, e: toml::de::Error, doc: &Spanned<DeTable<'_>>) -> Located {
        let span = e.span().filter(|s| *s != doc.span());
        let key = span
            .as_ref()
            .and_then(|s| find_key(doc.get_ref(), s.start, &mut Vec::new()));
        let unknown_field = e.message().starts_with("unknown field");
        // serde speaks of maps and sequences; TOML users know tables and arrays.
        let mut message = e
            .message()
            .trim_end()
            .replace("expected a map", "expected a table")
            .replace("invalid type: map", "invalid type: table")
            .replace("invalid type: sequence", "invalid type: array");
        if let Some(path) = &key {
            if path.last().is_some_and(|k| k.starts_with("password")) {
                // Shape errors quote the value; a mistyped password must not end up in logs.
                message = "must be a string".to_owned();
            }
            if message.starts_with("unknown field") {
                if let Some(last) = path.last().filter(|k| PLANNED_KEYS.contains(&k.as_str())) {
                    message = format!("`{last}` is not supported by this version yet");
                }
            }
        }
        Located {
            error: ConfigError {
                file: self.file.clone(),
                line: span.map(|s| self.line_of(s.start)),
                key: key.as_ref().map(|k| key_path(k.iter().map(String::as_str))),
                message,
            },
            path: key,
            unknown_field,
        }
    }
}

/// Removes the entry at `path` (keys from the root; an array on the way is removed whole).
/// Returns whether something was removed.
fn remove_path(table: &mut DeTable<'_>, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return table.remove(first.as_str()).is_some();
    }
    let Some(value) = table.get_mut(first.as_str()) else {
        return false;
    };
    match value.get_mut() {
        DeValue::Table(inner) => remove_path(inner, rest),
        DeValue::Array(_) => table.remove(first.as_str()).is_some(),
        _ => false,
    }
}

/// The path of keys whose key or value contains `offset`, deepest first.
fn find_key(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> Option<Vec<String>> {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        if key.span().contains(&offset) {
            return Some(path.clone());
        }
        if let Some(found) = find_in_value(value, offset, path) {
            return Some(found);
        }
        path.pop();
    }
    None
}

fn find_in_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    match value.get_ref() {
        DeValue::Table(inner) => {
            if let Some(found) = find_key(inner, offset, path) {
                return Some(found);
            }
        }
        DeValue::Array(items) => {
            for item in items {
                if let Some(found) = find_in_value(item, offset, path) {
                    return Some(found);
                }
            }
        }
        _ => {}
    }
    value.span().contains(&offset).then(|| path.clone())
}

/// Dotted key path as TOML would write it: `services.web.tcp_listen`, `services."my web"`.
pub fn key_path<'k>(keys: impl IntoIterator<Item = &'k str>) -> String {
    keys.into_iter()
        .map(|k| {
            let bare = !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if bare {
                k.to_owned()
            } else {
                format!("{k:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_quote_when_needed() {
        assert_eq!(key_path(["services", "web", "local"]), "services.web.local");
        assert_eq!(key_path(["services", "my web"]), "services.\"my web\"");
        assert_eq!(key_path(["services", "a.b"]), "services.\"a.b\"");
    }

    #[test]
    fn resolves_relative_paths_against_the_file() {
        let src = Source::new(Path::new("/etc/dialback/gateway.toml"), "");
        assert_eq!(
            src.resolve(Path::new("gw.key")),
            Path::new("/etc/dialback/gw.key")
        );
        assert_eq!(
            src.resolve(Path::new("./state")),
            Path::new("/etc/dialback/state")
        );
        assert_eq!(
            src.resolve(Path::new("../x")),
            Path::new("/etc/dialback/../x")
        );
        assert_eq!(src.resolve(Path::new("/abs")), Path::new("/abs"));
        let bare = Source::new(Path::new("gateway.toml"), "");
        assert_eq!(bare.resolve(Path::new("./state")), Path::new("state"));
        assert_eq!(bare.resolve(Path::new(".")), Path::new("."));
    }

    #[test]
    fn lines_are_one_based() {
        let src = Source::new(Path::new("f.toml"), "a = 1\nb = 2\n");
        assert_eq!(src.line_of(0), 1);
        assert_eq!(src.line_of(6), 2);
        assert_eq!(src.line_of(1000), 3);
    }
}
