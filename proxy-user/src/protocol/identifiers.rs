//! Agent identifiers (`agentidentifiers` metadata) and matching a dial host against them.

use std::net::IpAddr;

/// What an agent says it can reach, in the stock URL-query form
/// `ipv4=…&ipv6=…&host=…&cidr=…&default-route=true`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentIdentifiers {
    pub ipv4: Vec<IpAddr>,
    pub ipv6: Vec<IpAddr>,
    pub hosts: Vec<String>,
    pub cidrs: Vec<Cidr>,
    pub default_route: bool,
}

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// An identifier the agent sent that konduit cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentifierError {
    #[error("identifier {key}={value:?} is not a valid {what}")]
    Invalid { key: String, value: String, what: &'static str },
    #[error("identifier key {0:?} is unknown")]
    UnknownKey(String),
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = s.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl AgentIdentifiers {
    /// Parses the URL-query form. Stock servers ignore keys they do not know;
    /// konduit does the same but reports malformed addresses.
    pub fn parse(query: &str) -> Result<Self, IdentifierError> {
        let mut ids = AgentIdentifiers::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let invalid = |what| IdentifierError::Invalid { key: key.to_string(), value: value.to_string(), what };
            match key.as_ref() {
                "ipv4" => {
                    ids.ipv4.push(value.parse::<std::net::Ipv4Addr>().map_err(|_| invalid("IPv4 address"))?.into())
                }
                "ipv6" => {
                    ids.ipv6.push(value.parse::<std::net::Ipv6Addr>().map_err(|_| invalid("IPv6 address"))?.into())
                }
                "host" => ids.hosts.push(value.to_ascii_lowercase()),
                "cidr" => ids.cidrs.push(Cidr::parse(&value).ok_or_else(|| invalid("CIDR"))?),
                "default-route" => ids.default_route = value.parse().map_err(|_| invalid("boolean"))?,
                _ => return Err(IdentifierError::UnknownKey(key.to_string())),
            }
        }
        Ok(ids)
    }

    /// The URL-query form, as the agent sends it.
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for ip in self.ipv4.iter().chain(&self.ipv6) {
            q.append_pair(if ip.is_ipv4() { "ipv4" } else { "ipv6" }, &ip.to_string());
        }
        for h in &self.hosts {
            q.append_pair("host", h);
        }
        for c in &self.cidrs {
            q.append_pair("cidr", &format!("{}/{}", c.addr, c.prefix));
        }
        if self.default_route {
            q.append_pair("default-route", "true");
        }
        q.finish()
    }

    /// Whether the host part of a dial address names this agent exactly
    /// (the stock `destHost` strategy).
    pub fn matches_host(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => self.ipv4.contains(&ip) || self.ipv6.contains(&ip),
            Err(_) => self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }

    /// Whether the dial host falls in one of the agent's CIDRs (konduit's `cidr` strategy).
    pub fn matches_cidr(&self, host: &str) -> bool {
        host.parse::<IpAddr>().is_ok_and(|ip| self.cidrs.iter().any(|c| c.contains(ip)))
    }
}

/// Splits `host:port` (with `[v6]:port`) and returns the host without brackets.
pub fn dial_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stock_query_form_and_round_trips() {
        let ids = AgentIdentifiers::parse(
            "ipv4=10.0.0.5&ipv6=fd00%3A%3A5&host=Node-1&cidr=10.244.1.0%2F24&default-route=true",
        )
        .expect("valid");
        assert_eq!(ids.hosts, vec!["node-1".to_string()]);
        assert!(ids.default_route);
        assert!(ids.matches_host("10.0.0.5"));
        assert!(ids.matches_host("fd00::5"));
        assert!(ids.matches_host("NODE-1"));
        assert!(!ids.matches_host("10.0.0.6"));
        assert!(ids.matches_cidr("10.244.1.77"));
        assert!(!ids.matches_cidr("10.244.2.1"));
        assert_eq!(AgentIdentifiers::parse(&ids.to_query()), Ok(ids));
    }

    #[test]
    fn rejects_malformed_identifiers() {
        assert!(AgentIdentifiers::parse("ipv4=not-an-ip").is_err());
        assert!(AgentIdentifiers::parse("cidr=10.0.0.0/33").is_err());
        assert_eq!(AgentIdentifiers::parse("color=blue"), Err(IdentifierError::UnknownKey("color".into())));
        assert_eq!(AgentIdentifiers::parse(""), Ok(AgentIdentifiers::default()));
    }

    #[test]
    fn dial_host_strips_port_and_brackets() {
        assert_eq!(dial_host("10.0.0.1:10250"), "10.0.0.1");
        assert_eq!(dial_host("[fd00::1]:443"), "fd00::1");
        assert_eq!(dial_host("node-1:22"), "node-1");
    }

    #[test]
    fn cidr_zero_prefix_matches_everything_of_its_family() {
        let all = Cidr::parse("0.0.0.0/0").expect("valid");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        assert!(!all.contains("::1".parse().expect("ip")));
    }
}
