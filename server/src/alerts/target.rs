//! Where a webhook may go: not to this host, a private network, a link-local (cloud
//! metadata) or other special address, unless the operator allows it. Checked when the
//! address is looked up for the delivery, and again by the connection's own lookup.

use std::net::{IpAddr, ToSocketAddrs};

use super::deliver::SendError;

/// Why such an address is refused, and what allows it.
const NOT_PUBLIC: &str =
    "a private, loopback or link-local address: refused (--alert-allow-private-targets allows it)";

/// Refuses a webhook address that resolves to this host, a private network, a link-local
/// (cloud metadata) or other special address, unless those are allowed.
pub fn check_target(url: &str, allow_private: bool) -> Result<(), SendError> {
    let parsed = url::Url::parse(url).map_err(|e| SendError::fatal(format!("{url}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SendError::fatal(format!("{url}: not http or https")));
    }
    if allow_private {
        return Ok(());
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| SendError::fatal(format!("{url}: no host")))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = (host.trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .map_err(|e| SendError::retry(format!("{host}: {e}")))?
        .map(|a| a.ip())
        .collect();
    if let Some(ip) = addrs.iter().find(|ip| !is_public(ip)) {
        return Err(SendError::fatal(format!("{host} is {ip}, {NOT_PUBLIC}")));
    }
    Ok(())
}

/// Why a webhook at `url` is refused whatever its name resolves to, if it is: its host is a
/// private, loopback or link-local address written out, or `localhost`. A name is checked
/// when it is sent to ([`check_target`]), since its answer may change.
pub fn refused_as_written(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let ip = match parsed.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            return (name == "localhost" || name.ends_with(".localhost")).then(|| {
                format!("{name} is this host: refused (--alert-allow-private-targets allows it)")
            });
        }
    };
    (!is_public(&ip)).then(|| format!("{ip} is {NOT_PUBLIC}"))
}

/// An agent over `settings` whose connections reach only what [`check_target`] allows:
/// that looks the name up once, the connection looks it up again, and a name whose answer
/// changed in between (DNS rebinding) would otherwise reach what it refused.
pub(super) fn agent(settings: ureq::config::Config, allow_private: bool) -> ureq::Agent {
    if allow_private {
        return settings.new_agent();
    }
    ureq::Agent::with_parts(
        settings,
        ureq::unversioned::transport::DefaultConnector::new(),
        PublicOnly::default(),
    )
}

/// The connection's own lookup, refusing any answer [`check_target`] would have refused.
#[derive(Debug, Default)]
struct PublicOnly(ureq::unversioned::resolver::DefaultResolver);

impl ureq::unversioned::resolver::Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let found = self.0.resolve(uri, config, timeout)?;
        match found.iter().find(|a| !is_public(&a.ip())) {
            Some(a) => Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is now {}, a private, loopback or link-local address: refused",
                    uri.host().unwrap_or_default(),
                    a.ip()
                ),
            ))),
            None => Ok(found),
        }
    }
}

fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // Carrier-grade NAT, 100.64.0.0/10.
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(&IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Unique local fc00::/7 and link-local fe80::/10.
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::unversioned::resolver::Resolver;

    #[test]
    fn private_and_metadata_targets_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9/x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/",
            "http://[::1]:8080/",
            "http://[fd00::1]/",
            "http://100.64.0.1/",
        ] {
            let e = check_target(url, false).unwrap_err();
            assert!(!e.retry, "{url}: {e:?}");
            assert!(check_target(url, true).is_ok());
        }
        assert!(is_public(&"93.184.216.34".parse().unwrap()));
        assert!(check_target("file:///etc/passwd", true).is_err());
    }

    /// What is refused from its address as written, before any lookup: a subscription to it
    /// is refused at once, rather than failing every delivery.
    #[test]
    fn addresses_written_out_are_judged_without_a_lookup() {
        for url in [
            "http://127.0.0.1:9/x",
            "http://2130706433/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:10.0.0.1]/",
            "http://localhost:8080/",
            "http://api.LOCALHOST./",
        ] {
            let why = refused_as_written(url).unwrap_or_else(|| panic!("{url} passed"));
            assert!(why.contains("--alert-allow-private-targets"), "{why}");
        }
        for url in ["https://hooks.example.com/x", "http://93.184.216.34/"] {
            assert_eq!(refused_as_written(url), None, "{url}");
        }
    }

    /// The connection's lookup refuses what the first check would have: a name that turned
    /// into a private address between the two (DNS rebinding) reaches nothing.
    #[test]
    fn the_connection_refuses_private_answers_too() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let agent = super::agent(ureq::Agent::config_builder().build(), false);
        for url in [
            format!("http://localhost:{port}/"),
            format!("http://127.0.0.1:{port}/"),
        ] {
            let e = agent.post(&url).send(&b"{}"[..]).unwrap_err();
            assert!(e.to_string().contains("refused"), "{url}: {e}");
        }
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "nothing connected");
        let uri: ureq::http::Uri = "http://93.184.216.34/".parse().unwrap();
        let config = ureq::Agent::config_builder().build();
        let public = PublicOnly::default().resolve(&uri, &config, Default::default());
        assert!(public.is_ok(), "{public:?}");
    }
}
