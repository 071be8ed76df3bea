//! Access rules (`allow_from`, `clients_allow`) and PROXY protocol keys (`send_proxy`).

use dialback_core::acl::AllowList;
use dialback_core::proxy_protocol::Version;
use toml::Spanned;

use super::source::Source;
use super::ConfigError;

pub type RawRules = Spanned<Vec<Spanned<String>>>;

/// A rule list; absent means everyone. Each bad rule is reported at its own position.
pub fn allow_list(
    src: &Source<'_>,
    key: &str,
    value: Option<&RawRules>,
    problems: &mut Vec<ConfigError>,
) -> AllowList {
    let Some(value) = value else {
        return AllowList::any();
    };
    if value.get_ref().is_empty() {
        problems.push(src.error_at(
            Some(value.span()),
            key,
            "an empty list allows nobody; write [\"*\"] to allow everyone",
        ));
        return AllowList::any();
    }
    let mut rules = Vec::new();
    for text in value.get_ref() {
        match dialback_core::acl::Rule::parse(text.get_ref()) {
            Ok(r) => rules.push(r),
            Err(e) => problems.push(src.error_at(
                Some(text.span()),
                key,
                format!(
                    "{:?}: {}; a rule is \"*\", an address, a CIDR block like \"10.0.0.0/8\", a prefix like \"51.254.\" or a DNS name",
                    text.get_ref(),
                    e.why
                ),
            )),
        }
    }
    AllowList::new(rules)
}

/// `send_proxy = "off" | "v1" | "v2"`.
pub fn send_proxy(
    src: &Source<'_>,
    key: &str,
    value: Option<&Spanned<String>>,
) -> Result<Option<Version>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.get_ref().as_str() {
        "off" => Ok(None),
        "v1" => Ok(Some(Version::V1)),
        "v2" => Ok(Some(Version::V2)),
        other => Err(src.error_at(
            Some(value.span()),
            key,
            format!("{other:?}: must be \"off\", \"v1\" (text) or \"v2\" (binary)"),
        )),
    }
}
