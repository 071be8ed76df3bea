//! Access rules: who may register as a service's agent (`allow_from`) and who may be a public
//! client of it (`clients_allow`).
//!
//! A rule is `*`, an exact address (`203.0.113.7`, `2001:db8::1`), a CIDR block
//! (`10.0.0.0/8`), an IPv4 prefix ending in a dot (`51.254.`, the same as `51.254.0.0/16`), or
//! a DNS name. Names are never resolved here: the runtime resolves them when a connection
//! arrives and passes the addresses in, so a home machine on dynamic DNS is recognised by the
//! address its name has at that moment.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted in a rule.
pub const MAX_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Any,
    /// Addresses whose first `bits` bits equal those of `addr`.
    Net {
        addr: IpAddr,
        bits: u8,
    },
    /// A DNS name, lowercased, without a trailing dot.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule:?}: {why}")]
pub struct RuleError {
    pub rule: String,
    pub why: &'static str,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        let err = |why| RuleError {
            rule: text.to_owned(),
            why,
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(err("empty rule"));
        }
        if t == "*" {
            return Ok(Rule::Any);
        }
        if let Some((ip, bits)) = t.split_once('/') {
            let addr: IpAddr = ip
                .parse()
                .map_err(|_| err("a CIDR block needs an IP address before the /"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| err("prefix length out of range"))?;
            if mask(addr, bits) != addr {
                return Err(err("address has bits set beyond the prefix length"));
            }
            return Ok(Rule::Net { addr, bits });
        }
        if let Ok(addr) = t.parse::<IpAddr>() {
            let bits = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Rule::Net {
                addr: canonical(addr),
                bits,
            });
        }
        if let Some(head) = t
            .strip_suffix('.')
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        {
            let mut octets = [0u8; 4];
            let parts: Vec<&str> = head.split('.').collect();
            if parts.len() > 3 {
                return Err(err("an address prefix has at most 3 numbers (a full address needs no dot at the end)"));
            }
            for (i, p) in parts.iter().enumerate() {
                octets[i] = p
                    .parse()
                    .ok()
                    .filter(|_| !p.is_empty() && (p.len() == 1 || !p.starts_with('0')))
                    .ok_or_else(|| err("each number of an address prefix is 0 to 255"))?;
            }
            return Ok(Rule::Net {
                addr: IpAddr::V4(Ipv4Addr::from(octets)),
                bits: 8 * parts.len() as u8,
            });
        }
        let name = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
        if !valid_name(&name) {
            return Err(err(
                "not an address, a CIDR block, a prefix like \"51.254.\" or a DNS name",
            ));
        }
        Ok(Rule::Name(name))
    }

    fn matches(&self, ip: IpAddr, resolved: &dyn Fn(&str) -> Vec<IpAddr>) -> bool {
        match self {
            Rule::Any => true,
            Rule::Net { addr, bits } => addr.is_ipv4() == ip.is_ipv4() && mask(ip, *bits) == *addr,
            Rule::Name(n) => resolved(n).into_iter().any(|a| canonical(a) == ip),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Any => f.write_str("*"),
            Rule::Net { addr, bits } if *bits == if addr.is_ipv4() { 32 } else { 128 } => {
                write!(f, "{addr}")
            }
            Rule::Net { addr, bits } => write!(f, "{addr}/{bits}"),
            Rule::Name(n) => f.write_str(n),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // All-numeric dotted strings are malformed addresses, not names.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// An IPv4 peer seen on a dual-stack socket arrives as `::ffff:a.b.c.d`; rules compare it as
/// the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn mask(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// A list of rules; an address is allowed when any rule matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    rules: Vec<Rule>,
}

impl Default for AllowList {
    fn default() -> Self {
        AllowList::any()
    }
}

impl AllowList {
    /// Everyone: the default.
    pub fn any() -> Self {
        AllowList {
            rules: vec![Rule::Any],
        }
    }

    pub fn new(rules: Vec<Rule>) -> Self {
        AllowList { rules }
    }

    /// Parses every rule; an empty list would lock everyone out and is refused.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Self, RuleError> {
        if texts.is_empty() {
            return Err(RuleError {
                rule: String::new(),
                why: "an empty list allows nobody; write [\"*\"] to allow everyone",
            });
        }
        let rules = texts
            .iter()
            .map(|t| Rule::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowList { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn allows_everyone(&self) -> bool {
        self.rules.contains(&Rule::Any)
    }

    /// The DNS names the runtime must resolve before asking [`AllowList::allows`].
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(|r| match r {
            Rule::Name(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Whether `ip` matches a rule. `resolved` gives the addresses a name had when the
    /// connection arrived (empty when it did not resolve: the rule matches nothing).
    pub fn allows(&self, ip: IpAddr, resolved: &dyn Fn(&str) -> Vec<IpAddr>) -> bool {
        let ip = canonical(ip);
        self.rules.iter().any(|r| r.matches(ip, resolved))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn none(_: &str) -> Vec<IpAddr> {
        Vec::new()
    }

    fn allows(rules: &[&str], addr: &str) -> bool {
        AllowList::parse(rules).unwrap().allows(ip(addr), &none)
    }

    #[test]
    fn forms() {
        assert!(allows(&["*"], "203.0.113.9"));
        assert!(allows(&["*"], "2001:db8::1"));
        assert!(allows(&["203.0.113.7"], "203.0.113.7"));
        assert!(!allows(&["203.0.113.7"], "203.0.113.8"));
        assert!(allows(&["10.0.0.0/8"], "10.200.3.4"));
        assert!(!allows(&["10.0.0.0/8"], "11.0.0.1"));
        assert!(allows(&["0.0.0.0/0"], "1.2.3.4"));
        assert!(!allows(&["0.0.0.0/0"], "::1"));
        assert!(allows(&["51.254."], "51.254.17.3"));
        assert!(!allows(&["51.254."], "51.25.4.3"));
        assert!(!allows(&["51.254."], "51.2.54.3"));
        assert!(allows(&["51."], "51.0.0.1"));
        assert!(allows(&["51.254.1."], "51.254.1.200"));
        assert!(allows(&["2001:db8::/32"], "2001:db8:ff::1"));
        assert!(!allows(&["2001:db8::/32"], "2001:db9::1"));
        assert!(allows(&["::1"], "::1"));
        // IPv4 peers on dual-stack sockets match IPv4 rules.
        assert!(allows(&["127.0.0.0/8"], "::ffff:127.0.0.1"));
        assert!(allows(&["1.2.3.4", "10.0.0.0/8"], "10.1.1.1"));
    }

    #[test]
    fn names_use_the_resolution_given() {
        let list = AllowList::parse(&["Home.Example.org."]).unwrap();
        assert_eq!(list.names().collect::<Vec<_>>(), ["home.example.org"]);
        let resolved = |n: &str| {
            assert_eq!(n, "home.example.org");
            vec![ip("198.51.100.4"), ip("2001:db8::4")]
        };
        assert!(list.allows(ip("198.51.100.4"), &resolved));
        assert!(list.allows(ip("2001:db8::4"), &resolved));
        assert!(!list.allows(ip("198.51.100.5"), &resolved));
        assert!(!list.allows(ip("198.51.100.4"), &none));
        let mapped = |_: &str| vec![ip("::ffff:198.51.100.4")];
        assert!(list.allows(ip("198.51.100.4"), &mapped));
    }

    #[test]
    fn bad_rules() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "::/129",
            "1.2.3.4.",
            "256.",
            "01.",
            "1..",
            "-bad.example",
            "bad-.",
            "a b",
            "1.2.3",
            "10.0.0.0/x",
            "/8",
            "ex*mple.com",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(AllowList::parse::<&str>(&[]).is_err());
        assert_eq!(
            Rule::parse("localhost").unwrap(),
            Rule::Name("localhost".into())
        );
    }

    #[test]
    fn display_round_trips() {
        for r in [
            "*",
            "10.0.0.0/8",
            "51.254.0.0/16",
            "1.2.3.4",
            "::1",
            "2001:db8::/32",
            "a.example",
        ] {
            let rule = Rule::parse(r).unwrap();
            assert_eq!(Rule::parse(&rule.to_string()).unwrap(), rule);
        }
        assert_eq!(Rule::parse("51.254.").unwrap().to_string(), "51.254.0.0/16");
    }

    use proptest::prelude::*;

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|a| IpAddr::V4(a.into())),
            any::<[u8; 16]>().prop_map(|a| IpAddr::V6(a.into())),
        ]
    }

    proptest! {
        /// A CIDR rule matches exactly the addresses that share its first `bits` bits, and
        /// prints to text that parses back to itself.
        #[test]
        fn cidr_matches_by_bits(net in any_ip(), ip in any_ip(), bits in 0u8..=128) {
            let max = if net.is_ipv4() { 32 } else { 128 };
            let bits = bits % (max + 1);
            let addr = mask(net, bits);
            let rule = Rule::parse(&format!("{addr}/{bits}")).unwrap();
            prop_assert_eq!(&rule, &Rule::Net { addr, bits });
            prop_assert_eq!(Rule::parse(&rule.to_string()).unwrap(), rule.clone());
            let list = AllowList::new(vec![rule]);
            let ip = canonical(ip);
            let same_family = ip.is_ipv4() == addr.is_ipv4();
            let expected = same_family && {
                let (a, b) = match (ip, addr) {
                    (IpAddr::V4(x), IpAddr::V4(y)) => (u128::from(u32::from(x)) << 96, u128::from(u32::from(y)) << 96),
                    (IpAddr::V6(x), IpAddr::V6(y)) => (u128::from(x), u128::from(y)),
                    _ => (0, 1),
                };
                bits == 0 || (a ^ b) >> (128 - u32::from(bits)) == 0
            };
            prop_assert_eq!(list.allows(ip, &none), expected);
        }

        #[test]
        fn any_text_parses_or_errs_without_panicking(text in ".{0,80}") {
            let _ = Rule::parse(&text);
        }
    }
}
