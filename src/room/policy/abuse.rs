//! Who is the client, who skips the queue, and how many tickets one address may take.

use std::collections::HashMap;
use std::net::IpAddr;

use axum::http::HeaderMap;
use parking_lot::Mutex;

use super::Bypass;

/// An IP range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.trim().parse::<IpAddr>().ok()?, Some(p.trim().parse::<u8>().ok()?)),
            None => (s.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { net: addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => mask_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => mask_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn mask_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = (prefix / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = prefix % 8;
    rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0
}

/// The client's address: the socket peer, or — only when the peer is a trusted proxy — the
/// left-most untrusted address in the configured header (`X-Forwarded-For` by default).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr], header: &str) -> IpAddr {
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let Some(value) = headers.get(header).and_then(|v| v.to_str().ok()) else { return peer };
    // Walk from the right (nearest hop) past our own proxies.
    value
        .split(',')
        .rev()
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .find(|ip| !trusted.iter().any(|c| c.contains(*ip)))
        .unwrap_or(peer)
}

/// Whether this request skips the queue.
pub fn bypasses(bypass: &Bypass, ip: IpAddr, headers: &HeaderMap) -> bool {
    if bypass.cidrs.iter().filter_map(|c| Cidr::parse(c)).any(|c| c.contains(ip)) {
        return true;
    }
    match (&bypass.header_value, headers.get("x-weir-bypass")) {
        (Some(secret), Some(given)) => crate::admin::auth::constant_time_eq(secret.as_bytes(), given.as_bytes()),
        _ => false,
    }
}

/// Tracked addresses per room before the oldest windows are dropped: bounds memory under a
/// flood from many addresses (each entry is ~40 bytes).
pub const MAX_TRACKED_IPS: usize = 100_000;

/// Fixed one-minute windows of new tickets per address.
#[derive(Default)]
pub struct PerIpLimiter {
    windows: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl PerIpLimiter {
    /// Counts one entry for `ip` at `now_s`; `Err(retry_after_s)` when over `limit`.
    pub fn check(&self, ip: IpAddr, now_s: i64, limit: u32) -> Result<(), u64> {
        let minute = now_s.div_euclid(60);
        let mut windows = self.windows.lock();
        if windows.len() >= MAX_TRACKED_IPS && !windows.contains_key(&ip) {
            windows.retain(|_, (m, _)| *m == minute);
            metrics::counter!("weir_per_ip_table_evictions_total").increment(1);
            if windows.len() >= MAX_TRACKED_IPS {
                // Still full of live windows: refuse rather than grow.
                return Err(60 - now_s.rem_euclid(60) as u64);
            }
        }
        let entry = windows.entry(ip).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        if entry.1 >= limit {
            return Err((60 - now_s.rem_euclid(60)) as u64);
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Cidr::parse("192.168.1.7").unwrap().contains("192.168.1.7".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32").unwrap().contains("2001:db8:1::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", ""] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn client_ip_trusts_only_trusted_proxies() {
        let trusted = vec![Cidr::parse("127.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 1.2.3.4, 127.0.0.2".parse().unwrap());
        assert_eq!(client_ip("127.0.0.1".parse().unwrap(), &h, &trusted, "x-forwarded-for"), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip("9.9.9.9".parse().unwrap(), &h, &trusted, "x-forwarded-for"), "9.9.9.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn per_ip_windows() {
        let l = PerIpLimiter::default();
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        assert!(l.check(ip, 120, 2).is_ok());
        assert!(l.check(ip, 121, 2).is_ok());
        assert_eq!(l.check(ip, 130, 2), Err(50));
        assert!(l.check("1.2.3.5".parse().unwrap(), 130, 2).is_ok());
        assert!(l.check(ip, 180, 2).is_ok(), "next minute");
    }
}
